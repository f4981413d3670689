"""Optimizer parameter groups that apply weight decay only where it regularises (nanoGPT's configure_optimizers)."""

from __future__ import annotations

from typing import Any

from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups for a torch optimizer: tensors of 2 or more dimensions (weight matrices,
    embeddings, stacked experts) with `weight_decay`, the rest (norm weights, biases) with none.

    Decaying a norm's gain or a bias pulls it towards zero without limiting the model's capacity,
    so only the matrices are decayed. Each group keeps `model.parameters()` order, and a tensor
    shared by two modules (tied embedding and lm_head) appears once, as optimizers require.
    """
    decay, no_decay = [], []
    for param in model.parameters():  # yields a shared tensor only once
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
