"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like Mistral.

The fused kernel normalises a tile of rows per program and keeps the per-row 1/rms for the
backward pass, which reduces the weight gradient in fp32 over a few persistent programs.
"""

from __future__ import annotations

import torch

from model.kernels._triton import jit, program_count, rows_per_program, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    rows,
    cols,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    mask = (row[:, None] < rows) & (col[None, :] < cols)
    offsets = row[:, None].to(tl.int64) * cols + col[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / cols + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offsets, (normed * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=row < rows)


@jit
def _backward_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    rows,
    cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(rows, BLOCK_M), programs):
        row = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (row[:, None] < rows) & (col[None, :] < cols)
        offsets = row[:, None].to(tl.int64) * cols + col[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        normed = x * rstd[:, None]
        dw += tl.sum(dy * normed, axis=0)
        dnormed = dy * w[None, :]
        dx = rstd[:, None] * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / cols)[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * cols + col, dw, mask=col < cols)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        block_n = triton.next_power_of_2(cols)
        block_m = rows_per_program(rows, block_n)
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        _forward_kernel[(triton.cdiv(rows, block_m),)](
            x2, weight, y, rstd, rows, cols, eps, BLOCK_M=block_m, BLOCK_N=block_n
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.blocks = block_m, block_n
        return y.view(*shape[:-1], cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        block_m, block_n = ctx.blocks
        programs = min(program_count(x2.device), triton.cdiv(rows, block_m))
        dx = torch.empty_like(x2)
        dw_partial = torch.empty(programs, cols, dtype=torch.float32, device=x2.device)
        _backward_kernel[(programs,)](
            dy.reshape(rows, cols).contiguous(),
            x2,
            weight,
            rstd,
            dx,
            dw_partial,
            rows,
            cols,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        )
        return dx.view(dy.shape[:-1] + (cols,)), dw_partial.sum(0).to(weight.dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dimension of x (any leading shape)."""
    return _RMSNorm.apply(x, weight, eps)
