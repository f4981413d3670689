"""Rotary embedding of queries and keys in the rotate-half layout.

With halves x = [x1, x2] and the tables split the same way, the rotation is
[x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2]; its backward pass is the transposed rotation.
The fused kernel rotates a [batch, heads, seq, head_dim] tensor of any strides in place,
a tile of its (batch, head, position) rows per program.
"""

from __future__ import annotations

import torch

from model.kernels._triton import jit, rows_per_program, tl, triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@jit
def _rotate_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    rows,
    heads,
    seq,
    half,
    x_stride_b,
    x_stride_h,
    x_stride_s,
    table_stride_b,
    table_stride_s,
    TRANSPOSE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotates a tile of the (batch, head, position) rows of x in place; TRANSPOSE applies
    the inverse rotation (the backward pass)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b, h, s = r // (heads * seq), (r // seq) % heads, r % seq
    d = tl.arange(0, BLOCK_D)
    mask = (r[:, None] < rows) & (d[None, :] < half)
    table = b[:, None] * table_stride_b + s[:, None] * table_stride_s + d[None, :]
    cos1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        sin1, sin2 = -sin2, -sin1
    first = x_ptr + b[:, None] * x_stride_b + h[:, None] * x_stride_h + s[:, None] * x_stride_s + d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos1 - x2 * sin1).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + half, (x2 * cos2 + x1 * sin2).to(x_ptr.dtype.element_ty), mask=mask)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> None:
    batch, heads, seq, head_dim = x.shape
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    rows = batch * heads * seq
    block_r = rows_per_program(rows, block_d)
    _rotate_kernel[(triton.cdiv(rows, block_r),)](
        x,
        cos,
        sin,
        rows,
        heads,
        seq,
        half,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos.stride(0),
        cos.stride(1),
        TRANSPOSE=transpose,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )


class _RotaryInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        _rotate_(x, cos, sin, transpose=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        dx = dx.clone(memory_format=torch.contiguous_format)
        _rotate_(dx, cos, sin, transpose=True)
        return dx, None, None


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place (they must not be outputs of a multi-view op such as split)
    and returns them; shapes as in rotary_reference. q and k need a unit last-dimension stride."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_triton needs q and k with a unit stride in head_dim")
    cos, sin = _unit_stride(cos.expand(q.shape[0], -1, -1)), _unit_stride(sin.expand(q.shape[0], -1, -1))
    return _RotaryInPlace.apply(q, cos, sin), _RotaryInPlace.apply(k, cos, sin)
