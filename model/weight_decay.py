"""Optimizer parameter groups that apply weight decay only where it regularises (nanoGPT's configure_optimizers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def parameter_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Param groups for a torch optimizer: tensors of 2 or more dimensions (weight matrices,
    embeddings, stacked experts) with `weight_decay`, the rest (norm weights, biases) with none.

    Decaying a norm's gain or a bias pulls it towards zero without limiting the model's capacity,
    so only the matrices are decayed. The groups are runs of consecutive tensors alike in decay, so
    that the groups in order hold the tensors in the order given (`model.parameters()`, which
    yields a shared tensor such as a tied embedding once): hivemind lays out the parameters and
    optimizer state that peers exchange in that order, and a checkpoint maps them back by it.
    """
    groups: list[dict[str, Any]] = []
    for param in params:
        decay = weight_decay if param.dim() >= 2 else 0.0
        if not groups or groups[-1]["weight_decay"] != decay:
            groups.append({"params": [], "weight_decay": decay})
        groups[-1]["params"].append(param)
    return groups
