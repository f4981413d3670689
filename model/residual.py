"""ResidualProjection: the linear layers whose output is added to the residual stream."""

from __future__ import annotations

from torch import nn


class ResidualProjection(nn.Linear):
    """An nn.Linear that writes into the residual stream (attention's output projection, the MLP's
    down projection). It computes what nn.Linear does; the type tells `CausalLM._init_weights` to
    draw its weight with std / sqrt(2 * num_hidden_layers), as GPT-2 and nanoGPT do, so that the
    2 * num_hidden_layers additions leave the stream's variance at initialisation independent of depth."""
