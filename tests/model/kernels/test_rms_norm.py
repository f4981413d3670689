"""Fused RMSNorm against its reference: forward, input and weight gradients."""

import pytest
import torch

from model import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 64), (5, 3, 70), (37, 128), (2, 1000)]  # a single row, odd widths and row counts


def run(mode, x, weight, grad):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = kernels.rms_norm(x, weight, 1e-6, mode=mode)
    y.backward(grad)
    return y, x.grad, weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, assert_matches):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    grad = torch.randn(shape, dtype=dtype)
    fused, reference = run("triton", x, weight, grad), run("torch", x, weight, grad)
    assert fused[0].dtype == reference[0].dtype
    assert_matches(fused[0], reference[0], dtype)
    assert_matches(fused[1], reference[1], dtype)
    # The weight gradient sums over rows: its rounding error grows with their number.
    assert_matches(fused[2], reference[2], dtype, scale=1 if dtype == torch.float32 else 4)


def test_fp32_weight_on_bf16_input_promotes_like_reference(assert_matches):
    torch.manual_seed(0)
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    weight = torch.randn(40)
    grad = torch.randn(6, 40)
    fused, reference = run("triton", x, weight, grad), run("torch", x, weight, grad)
    assert fused[0].dtype == torch.float32
    for a, b in zip(fused, reference):
        assert_matches(a, b, torch.bfloat16)
