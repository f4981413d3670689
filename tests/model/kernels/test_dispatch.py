"""The dispatch point: which path each mode takes, and the errors where Triton cannot run."""

import pytest
import torch

from model import kernels
from model.kernels import _triton


def fused(y: torch.Tensor) -> bool:
    return "_RMSNorm" in y.grad_fn.name()


def rms_norm(mode, dtype=torch.float32):
    x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    return kernels.rms_norm(x, torch.ones(8, dtype=dtype), 1e-6, mode=mode)


def test_modes_on_cpu():
    assert fused(rms_norm("triton"))
    assert not fused(rms_norm("torch"))
    assert not fused(rms_norm("auto"))  # Triton only for CUDA tensors, even under the interpreter


def test_unsupported_dtype_falls_back_under_auto_and_raises_under_triton():
    assert not fused(rms_norm("auto", torch.float64))
    with pytest.raises(ValueError, match="unsupported inputs"):
        rms_norm("triton", torch.float64)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="kernels mode"):
        rms_norm("fast")


def test_triton_without_interpreter_or_package_raises_clearly(monkeypatch):
    monkeypatch.setattr(_triton, "_INTERPRETING", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm("triton")
    monkeypatch.setattr(_triton, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        rms_norm("triton")
    assert not fused(rms_norm("auto"))
