"""8-bit blockwise linear quantisation of a flat tensor, the wire format of the gradient codec.

The values are cut into blocks of `block_size` (default 256; the last block may be short).
Each block keeps its absolute maximum m as float32, and each value x becomes the signed code
q = round_half_away(x * ((1 / m) * 127)) in [-127, 127]; it decodes to q * (m * (1 / 127)).
Every step is one float32 operation (1 / 127 is the float32 constant), so any implementation
gets the same bytes and values. A block of
zeros has m = 0 and decodes to zeros; a NaN or infinite value makes m NaN, with codes 0,
so the whole block decodes to NaN rather than to wrong finite numbers.

Byte layout of the packed uint8 tensor for n values in b = ceil(n / block_size) blocks:
    bytes [0, 4b)       the b absmax values, float32, native (little-endian) byte order
    bytes [4b, 4b + n)  the n codes, int8 two's complement
That is 1 + 4 / block_size bytes per value (1.016 at 256) plus at most 4 bytes for the last block.
The count n and block_size travel out of band. The Triton kernel and the reference produce the
same bytes.
"""

from __future__ import annotations

import torch

from model.kernels._triton import elements_per_program, jit, tl, triton

BLOCK_SIZE = 256
_LEVELS = 127.0
_STEP = 1.0 / 127.0  # rounded to float32 where it multiplies
_CHUNK = 1 << 18  # values per step of the reference: 1 MiB of float32 scratch, cache-sized


def packed_size(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes that quantize_blockwise produces for numel values."""
    return 4 * -(-numel // block_size) + numel


def _split(packed: torch.Tensor, numel: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (absmax float32 [blocks], codes int8 [numel]) views of a packed buffer."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel, block_size):
        raise ValueError(
            f"expected a flat uint8 tensor of {packed_size(numel, block_size)} bytes for {numel} values, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    blocks = -(-numel // block_size)
    return packed[: 4 * blocks].view(torch.float32), packed[4 * blocks :].view(torch.int8)


def _quantize_rows(
    rows: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor, scaled: torch.Tensor, work: torch.Tensor
) -> None:
    """Quantises float32 rows [k, block_size] into absmax [k] and codes [k, block_size] (int8),
    using the float32 scratch tensors scaled and work of the rows' shape (work may be rows)."""
    torch.abs(rows, out=scaled)
    torch.amax(scaled, dim=1, out=absmax)
    absmax.add_(absmax * 0.0)  # NaN, not inf, when the block is not finite
    scale = absmax.reciprocal().mul_(_LEVELS).masked_fill_(~(absmax > 0), 0.0)
    torch.mul(rows, scale[:, None], out=scaled)
    if absmax.isnan().any():
        scaled.masked_fill_(absmax.isnan()[:, None], 0.0)
    # round half away from zero: sign(s) * (|s| + 0.5) is exact in float32 (rounding is symmetric
    # in the sign), and the conversion to int8 truncates, which is floor for |s| + 0.5 >= 0
    torch.sign(scaled, out=work)
    codes.copy_(scaled.add_(work, alpha=0.5))


def _output(x: torch.Tensor, block_size: int, out: torch.Tensor | None) -> torch.Tensor:
    """The packed buffer to write: out when given (checked), else a new one."""
    size = packed_size(x.numel(), block_size)
    if out is None:
        return torch.empty(size, dtype=torch.uint8, device=x.device)
    if out.dtype != torch.uint8 or out.shape != (size,) or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous uint8 tensor of {size} bytes on {x.device}, "
            f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}"
        )
    return out


def quantize_blockwise_reference(
    x: torch.Tensor, block_size: int = BLOCK_SIZE, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Packs x (any shape and float dtype, read flat) into the uint8 layout above, in out if given.

    Works through _CHUNK values at a time with reused float32 scratch, so that its few passes
    run in cache; full blocks are read in place and codes written straight into the output."""
    flat = x.reshape(-1)
    numel = flat.numel()
    packed = _output(x, block_size, out)
    absmax_out, codes_out = _split(packed, numel, block_size)
    full = numel // block_size
    rows_per_chunk = max(1, _CHUNK // block_size)
    chunk_rows = min(full, rows_per_chunk) if full else 1
    scaled = torch.empty(chunk_rows, block_size, dtype=torch.float32, device=x.device)
    work = torch.empty_like(scaled)
    for first in range(0, full, rows_per_chunk):
        k = min(full - first, rows_per_chunk)
        rows = flat[first * block_size : (first + k) * block_size].view(k, block_size)
        if rows.dtype != torch.float32:
            rows = work[:k].copy_(rows)
        _quantize_rows(
            rows,
            absmax_out[first : first + k],
            codes_out[first * block_size : (first + k) * block_size].view(k, block_size),
            scaled[:k],
            work[:k],
        )
    if numel > full * block_size:  # the short last block, zero-padded
        tail = torch.zeros(1, block_size, dtype=torch.float32, device=x.device)
        tail[0, : numel - full * block_size] = flat[full * block_size :]
        codes = torch.empty(1, block_size, dtype=torch.int8, device=x.device)
        _quantize_rows(tail, absmax_out[full:], codes, scaled[:1], work[:1])
        codes_out[full * block_size :] = codes[0, : numel - full * block_size]
    return packed


def _decoded_output(packed: torch.Tensor, numel: int, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """The flat tensor to decode into: out when given (checked), else a new one."""
    if out is None:
        return torch.empty(numel, dtype=dtype, device=packed.device)
    if out.dtype != dtype or out.shape != (numel,) or out.device != packed.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous flat {dtype} tensor of {numel} values on {packed.device}, "
            f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}"
        )
    return out


def dequantize_blockwise_reference(
    packed: torch.Tensor,
    numel: int,
    block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decodes numel values from a packed buffer into a flat tensor of dtype (computed in float32),
    out if given."""
    absmax, codes = _split(packed, numel, block_size)
    step = absmax * _STEP
    out = _decoded_output(packed, numel, dtype, out)
    blocks = step.numel()
    rows_per_chunk = max(1, _CHUNK // block_size)
    scratch = (
        None
        if dtype == torch.float32
        else torch.empty(min(blocks, rows_per_chunk), block_size, dtype=torch.float32, device=packed.device)
    )
    full = numel // block_size
    for first in range(0, full, rows_per_chunk):
        k = min(full - first, rows_per_chunk)
        span = slice(first * block_size, (first + k) * block_size)
        target = out[span].view(k, block_size)
        values = target if scratch is None else scratch[:k]
        values.copy_(codes[span].view(k, block_size)).mul_(step[first : first + k, None])
        if scratch is not None:
            target.copy_(values)
    if numel > full * block_size:
        out[full * block_size :] = (codes[full * block_size :].to(torch.float32) * step[full:]).to(dtype)
    return out


@jit
def _quantize_kernel(
    x_ptr,
    absmax_ptr,
    codes_ptr,
    numel,
    blocks,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    block = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    index = block[:, None].to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = index < numel
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1) + tl.sum(x * 0.0, axis=1)  # NaN when the block is not finite
    inverse = tl.fdiv(tl.full(absmax.shape, 1.0, tl.float32), tl.where(absmax > 0, absmax, 1.0), ieee_rounding=True)
    scale = tl.where(absmax > 0, inverse * 127.0, 0.0)
    scaled = tl.where(scale[:, None] > 0, x * scale[:, None], 0.0)
    magnitude = tl.floor(tl.abs(scaled) + 0.5)
    codes = tl.where(scaled < 0, -magnitude, magnitude)
    tl.store(absmax_ptr + block, absmax, mask=block < blocks)
    tl.store(codes_ptr + index, codes.to(tl.int8), mask=mask)


@jit
def _dequantize_kernel(
    absmax_ptr,
    codes_ptr,
    out_ptr,
    numel,
    blocks,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    block = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    index = block[:, None].to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = index < numel
    absmax = tl.load(absmax_ptr + block, mask=block < blocks, other=0.0)
    step = absmax * (1.0 / 127.0)
    codes = tl.load(codes_ptr + index, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + index, (codes * step[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _grid(blocks: int, block_size: int) -> tuple[int, int]:
    per_program = max(1, min(triton.next_power_of_2(blocks), elements_per_program() // block_size))
    return triton.cdiv(blocks, per_program), per_program


def triton_supports(block_size: int) -> bool:
    """The kernels tile one block per row, so block_size must be a power of two."""
    return block_size > 0 and block_size & (block_size - 1) == 0


def _check_block_size(block_size: int) -> None:
    if not triton_supports(block_size):
        raise ValueError(f"the Triton codec needs a power-of-two block_size, got {block_size}")


def quantize_blockwise_triton(
    x: torch.Tensor, block_size: int = BLOCK_SIZE, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Same bytes as quantize_blockwise_reference, one pass over x."""
    _check_block_size(block_size)
    flat = x.reshape(-1).contiguous()
    numel = flat.numel()
    packed = _output(x, block_size, out)
    absmax, codes = _split(packed, numel, block_size)
    programs, per_program = _grid(absmax.numel(), block_size)
    if numel:
        _quantize_kernel[(programs,)](
            flat, absmax, codes, numel, absmax.numel(), BLOCK_SIZE=block_size, BLOCKS_PER_PROGRAM=per_program
        )
    return packed


def dequantize_blockwise_triton(
    packed: torch.Tensor,
    numel: int,
    block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same values as dequantize_blockwise_reference."""
    _check_block_size(block_size)
    absmax, codes = _split(packed, numel, block_size)
    out = _decoded_output(packed, numel, dtype, out)
    programs, per_program = _grid(absmax.numel(), block_size)
    if numel:
        _dequantize_kernel[(programs,)](
            absmax, codes, out, numel, absmax.numel(), BLOCK_SIZE=block_size, BLOCKS_PER_PROGRAM=per_program
        )
    return out
