"""Fused in-place rotary embedding against its reference, through a fused q/k/v projection."""

import pytest
import torch

from model import kernels
from model.rope import rope_cos_sin

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def project(x, weight, heads, kv_heads, head_dim):
    """q and k as the model slices them out of one projection (strided single views)."""
    batch, seq, _ = x.shape
    qkv = (x @ weight).view(batch, seq, -1, head_dim)
    return qkv[:, :, :heads].transpose(1, 2), qkv[:, :, heads : heads + kv_heads].transpose(1, 2)


def run(mode, x, weight, cos, sin, heads, kv_heads, grads):
    weight = weight.detach().requires_grad_()
    q, k = project(x, weight, heads, kv_heads, cos.shape[-1])
    q, k = kernels.rotary(q, k, cos, sin, mode=mode)
    torch.autograd.backward((q, k), grads)
    return q.detach(), k.detach(), weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, seq, heads, kv_heads, head_dim",
    [(1, 1, 1, 1, 8), (2, 13, 4, 2, 6), (2, 40, 3, 3, 32)],  # one token; odd seq and half-width; wider heads
)
def test_matches_reference(batch, seq, heads, kv_heads, head_dim, dtype, assert_matches):
    torch.manual_seed(0)
    x = torch.randn(batch, seq, 16, dtype=dtype)
    weight = torch.randn(16, (heads + 2 * kv_heads) * head_dim, dtype=dtype) / 4
    positions = torch.arange(3, 3 + seq).expand(batch, -1)
    cos, sin = rope_cos_sin(positions, head_dim, 10000.0, dtype)
    grads = (
        torch.randn(batch, heads, seq, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype),
    )
    fused = run("triton", x, weight, cos, sin, heads, kv_heads, grads)
    reference = run("torch", x, weight, cos, sin, heads, kv_heads, grads)
    assert_matches(fused[0], reference[0], dtype)
    assert_matches(fused[1], reference[1], dtype)
    # The projection's gradient sums over tokens: its rounding error grows with their number.
    assert_matches(fused[2], reference[2], dtype, scale=1 if dtype == torch.float32 else 4)


def test_rotates_in_place_and_broadcasts_tables(assert_matches):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 1, 5, 4)
    cos, sin = rope_cos_sin(torch.arange(5)[None], 4, 10000.0, torch.float32)  # batch 1, broadcast
    expected = kernels.rotary(q, k, cos, sin, mode="torch")
    q_out, k_out = kernels.rotary(q, k, cos, sin, mode="triton")
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert_matches(q_out, expected[0], torch.float32)
    assert_matches(k_out, expected[1], torch.float32)
