"""Dense feed-forward blocks: SwiGLU (Mistral) and GELU (BLOOM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels
from model.config import ModelConfig
from model.residual import ResidualProjection


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = ResidualProjection(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.kernels_mode = config.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(kernels.swiglu(gate, up, self.kernels_mode))


class GeluMLP(nn.Module):
    """down(gelu_tanh(up(x))), as in BLOOM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = ResidualProjection(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
