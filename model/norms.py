"""Normalisation layers: RMSNorm (Mistral, Mixtral) and LayerNorm with bias (BLOOM)."""

from __future__ import annotations

import torch
from torch import nn

from model import kernels
from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels_mode: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels_mode = kernels_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.kernels_mode)


def make_norm(config: ModelConfig) -> nn.Module:
    """The config's normalisation layer over hidden_size."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
    return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
