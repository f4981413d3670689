"""The model's single dispatch point for its fused operations.

Each operation has a plain PyTorch reference (the CPU path and the test oracle) in its own
module. `mode` is the config's `kernels` field: "torch" always takes the reference, "auto"
takes a fused kernel where one exists for the tensor's device, "triton" insists on one.
"""

from __future__ import annotations

import torch

from model.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy_reference
from model.kernels.rms_norm import rms_norm_reference
from model.kernels.rotary import rotary_reference
from model.kernels.swiglu import swiglu_reference

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "rms_norm", "rotary", "swiglu"]


def _fused(mode: str, x: torch.Tensor) -> bool:
    if mode == "triton":
        raise ValueError("kernels='triton': no Triton kernels are built into this version; use 'auto' or 'torch'")
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str = "auto") -> torch.Tensor:
    _fused(mode, x)
    return rms_norm_reference(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    _fused(mode, gate)
    return swiglu_reference(gate, up)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    _fused(mode, q)
    return rotary_reference(q, k, cos, sin)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX, mode: str = "auto",
) -> torch.Tensor:
    _fused(mode, hidden)
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index)
