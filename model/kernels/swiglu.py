"""SwiGLU gating: silu(gate) * up.

The fused kernel reads gate and up in place (they are usually the two halves of one
projection, so strided) and saves only them: the backward pass recomputes silu.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model.kernels._triton import jit, rows_per_program, tl, triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@jit
def _forward_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    rows,
    cols,
    gate_stride,
    up_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row[:, None] < rows) & (col[None, :] < cols)
    gate = tl.load(gate_ptr + row[:, None] * gate_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row[:, None] * up_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row[:, None] * cols + col[None, :], (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _backward_kernel(
    dout_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    rows,
    cols,
    gate_stride,
    up_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row[:, None] < rows) & (col[None, :] < cols)
    offsets = row[:, None] * cols + col[None, :]
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row[:, None] * gate_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row[:, None] * up_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dup = dout * silu.to(gate_ptr.dtype.element_ty).to(tl.float32)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, cols] with unit column stride, without copying when its layout allows."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(kernel: Any, rows: int, cols: int, *args: object) -> None:
    """Launches a SwiGLU kernel over [rows, cols] tiles."""
    block_n = min(triton.next_power_of_2(cols), 1024)
    block_m = rows_per_program(rows, block_n)
    kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](*args, BLOCK_M=block_m, BLOCK_N=block_n)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate2, up2 = _rows(gate), _rows(up)
        rows, cols = gate2.shape
        out = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
        _launch(_forward_kernel, rows, cols, gate2, up2, out, rows, cols, gate2.stride(0), up2.stride(0))
        ctx.save_for_backward(gate2, up2)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate2, up2 = ctx.saved_tensors
        rows, cols = gate2.shape
        dgate = torch.empty(rows, cols, dtype=gate2.dtype, device=gate2.device)
        dup = torch.empty_like(dgate)
        _launch(
            _backward_kernel,
            rows,
            cols,
            dout.reshape(rows, cols).contiguous(),
            gate2,
            up2,
            dgate,
            dup,
            rows,
            cols,
            gate2.stride(0),
            up2.stride(0),
        )
        return dgate.view(dout.shape), dup.view(dout.shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused silu(gate) * up for same-shape, same-dtype gate and up."""
    return _SwiGLU.apply(gate, up)
