"""Language-model head plus cross-entropy: mean loss over tokens whose label is not ignore_index."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """hidden: [tokens, hidden]; weight: [vocab, hidden]; labels: [tokens]."""
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
