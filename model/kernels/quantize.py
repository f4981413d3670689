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
    return packed[: 4 * blocks].view(torch.float32), packed[4 * blocks:].view(torch.int8)


def quantize_blockwise_reference(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Packs x (any shape and float dtype, read flat) into the uint8 layout above."""
    flat = x.reshape(-1).to(torch.float32)
    numel = flat.numel()
    packed = torch.empty(packed_size(numel, block_size), dtype=torch.uint8, device=x.device)
    absmax_out, codes_out = _split(packed, numel, block_size)
    padded = torch.nn.functional.pad(flat, (0, absmax_out.numel() * block_size - numel)).view(-1, block_size)
    absmax = padded.abs().amax(dim=1) + (padded * 0.0).sum(dim=1)  # NaN when the block is not finite
    scale = torch.where(absmax > 0, absmax.reciprocal() * _LEVELS, 0.0)
    scaled = torch.where(scale[:, None] > 0, padded * scale[:, None], 0.0)
    codes = torch.floor(scaled.abs() + 0.5).copysign(scaled)
    absmax_out.copy_(absmax)
    codes_out.copy_(codes.view(-1)[:numel])
    return packed


def dequantize_blockwise_reference(
    packed: torch.Tensor, numel: int, block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decodes numel values from a packed buffer into a flat tensor of dtype."""
    absmax, codes = _split(packed, numel, block_size)
    step = (absmax * _STEP).repeat_interleave(block_size)[:numel]
    return (codes.to(torch.float32) * step).to(dtype)


@jit
def _quantize_kernel(
    x_ptr, absmax_ptr, codes_ptr, numel, blocks,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
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
    absmax_ptr, codes_ptr, out_ptr, numel, blocks,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
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


def quantize_blockwise_triton(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Same bytes as quantize_blockwise_reference, one pass over x."""
    _check_block_size(block_size)
    flat = x.reshape(-1).contiguous()
    numel = flat.numel()
    packed = torch.empty(packed_size(numel, block_size), dtype=torch.uint8, device=x.device)
    absmax, codes = _split(packed, numel, block_size)
    programs, per_program = _grid(absmax.numel(), block_size)
    if numel:
        _quantize_kernel[(programs,)](
            flat, absmax, codes, numel, absmax.numel(), BLOCK_SIZE=block_size, BLOCKS_PER_PROGRAM=per_program
        )
    return packed


def dequantize_blockwise_triton(
    packed: torch.Tensor, numel: int, block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Same values as dequantize_blockwise_reference."""
    _check_block_size(block_size)
    absmax, codes = _split(packed, numel, block_size)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    programs, per_program = _grid(absmax.numel(), block_size)
    if numel:
        _dequantize_kernel[(programs,)](
            absmax, codes, out, numel, absmax.numel(), BLOCK_SIZE=block_size, BLOCKS_PER_PROGRAM=per_program
        )
    return out
