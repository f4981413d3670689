"""Fused SwiGLU against its reference, on strided halves of one projection and on separate tensors."""

import pytest
import torch

from model import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(mode, gate_up, grad):
    gate_up = gate_up.detach().requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    out = kernels.swiglu(gate, up, mode=mode)
    out.backward(grad)
    return out, gate_up.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (2, 7, 37), (3, 1100)])  # one row; odd; wider than one tile
def test_matches_reference_on_projection_halves(shape, dtype, assert_matches):
    torch.manual_seed(0)
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype) * 3
    grad = torch.randn(shape, dtype=dtype)
    fused, reference = run("triton", gate_up, grad), run("torch", gate_up, grad)
    for a, b in zip(fused, reference):
        assert_matches(a, b, dtype)


def test_separate_column_major_inputs(assert_matches):
    torch.manual_seed(0)
    gate = torch.randn(5, 9)
    up = torch.randn(9, 5).t()  # no unit stride in the last dimension: the kernel takes a copy
    grad = torch.randn(5, 9)
    results = []
    for mode in ("triton", "torch"):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = kernels.swiglu(g, u.t().contiguous().t(), mode=mode)
        out.backward(grad)
        results.append((out, g.grad, u.grad))
    for a, b in zip(*results):
        assert_matches(a, b, torch.float32)
