"""Starling's 8-bit blockwise gradient codec for hivemind's all-reduce.

`Blockwise8Bit` sends a tensor in the blockwise absmax int8 format of model.kernels.quantize
(256-value blocks, one float32 absmax per block, then one int8 code per value): about 1.016
bytes per value and a relative L2 error of about 0.007 on N(0,1) data. It encodes with the
Triton kernel for CUDA tensors and with the PyTorch reference elsewhere, and decodes on CPU.
Nothing in the encode or decode path uses numpy. A payload the kernel encoded is decoded again
before it is sent: unless every value reads back within half a code step of its block's scale (the
format's bound), the kernel is replaced by the reference for the rest of the process (guard.distrust:
one warning, counted in the peer's kernel fallbacks) and the payload is encoded again by the
reference. So a peer never sends a payload that its own decoder does not read back.

Payload (runtime_pb2.Tensor.buffer): a 16-byte header, then the packed bytes of quantize_blockwise:
    bytes [0, 4)    MAGIC, b"SB8\\x01" (format version 1)
    bytes [4, 8)    block size, uint32 little-endian (never 0)
    bytes [8, 16)   number of values, uint64 little-endian
The message's size, dtype and requires_grad fields carry the shape, the dtype to decode to
and the autograd flag, as for hivemind's own codecs.

hivemind decodes a message through hivemind.compression.serialization._BASE_COMPRESSION_TYPES,
keyed by the name of its closed runtime_pb2.CompressionType enum, so the codec travels as
BLOCKWISE_8BIT. `register()` installs an entry under that name which reads Starling payloads
by their header and hands every other payload to the decoder that was there before (hivemind's
bitsandbytes BlockwiseQuantization): a bitsandbytes payload starts with its absmax count as an
int64, whose bytes [4, 8) are zero for any tensor of fewer than 2**44 values, where ours hold
the block size. The entry also encodes in Starling's format: hivemind's reducers send each
averaged part back through the registry (serialize_torch_tensor with the part's compression
type), so without it half of a round's traffic went out in bitsandbytes' format, at about a
quarter of the speed and twice the error. Creating or unpickling a Blockwise8Bit calls
`register()`, so a process that averages with it reads and writes its payloads; calling it
again does nothing.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
import warnings

import torch
from hivemind.compression import CompressionBase, CompressionInfo, serialization
from hivemind.proto import runtime_pb2

from model.kernels import (
    BLOCK_SIZE,
    dequantize_blockwise,
    guard,
    packed_size,
    quantize_blockwise,
    quantize_blockwise_uses_kernel,
)

MAGIC = b"SB8\x01"
_LEVELS_8BIT = 127  # codes in [-127, 127] (model.kernels.quantize)
_HEADER = struct.Struct("<4sIQ")  # magic, block size, number of values
_REGISTRY_NAME = runtime_pb2.CompressionType.Name(runtime_pb2.BLOCKWISE_8BIT)
_SCRATCH_LIMIT = 1 << 26  # bytes of payload assembled in a reused per-thread buffer
_scratch = threading.local()
_MMAPPED_SIZE = 1 << 25  # glibc serves larger allocations with fresh pages from mmap
_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

# Decoding reads the received bytes in place (torch.frombuffer on an immutable bytes object)
# and never writes to them; torch warns about the read-only buffer once per process.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)


class _BlockwiseCodec(CompressionBase):
    """What Starling's blockwise codecs share: a block size, `bits` per value plus a float32 absmax
    per block, and registration in hivemind's registry wherever one is made or unpickled."""

    bits: int
    default_block_size: int

    def __init__(self, block_size: int | None = None):
        block_size = self.default_block_size if block_size is None else block_size
        if not 0 < block_size < 2**32:
            raise ValueError(f"block_size must be in [1, 2**32), got {block_size}")
        self.block_size = block_size
        register()  # whoever sends these payloads receives them too

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        register()  # unpickled in another process, such as a spawned averager

    def _check_floating(self, tensor: torch.Tensor) -> None:
        if not tensor.is_floating_point():
            raise ValueError(f"{type(self).__name__} does not support {tensor.dtype} tensors")

    def _message(self, buffer: bytes, tensor: torch.Tensor) -> runtime_pb2.Tensor:
        """hivemind's message for a payload of `tensor` (its shape, dtype and autograd flag)."""
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=buffer,
            size=tensor.shape,
            dtype=str(tensor.dtype).removeprefix("torch."),
            requires_grad=tensor.requires_grad,
        )

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return (self.bits + 32 / self.block_size) / torch.finfo(info.descriptor.dtype).bits

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(block_size={self.block_size})"


class Blockwise8Bit(_BlockwiseCodec):
    """8-bit blockwise absmax quantisation (see the module docstring for the payload); `kernels`
    chooses the encoder as model.kernels does (auto: the Triton kernel on CUDA)."""

    compression_type = runtime_pb2.BLOCKWISE_8BIT
    bits, default_block_size = 8, BLOCK_SIZE
    kernels = "auto"

    def __init__(self, block_size: int | None = None, kernels: str = "auto"):
        super().__init__(block_size)
        self.kernels = kernels

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        """Encodes a floating tensor (any shape, fp32, fp16 or bf16); it is never modified."""
        self._check_floating(tensor)
        message = self._encode(tensor, self.kernels)
        if quantize_blockwise_uses_kernel(tensor, self.block_size, self.kernels):
            problem = read_back_problem(_decode(message.buffer, message), tensor, self.block_size, _LEVELS_8BIT)
            if problem is not None:
                guard.distrust("quantize_blockwise", tensor.device, f"its payload does not read back: {problem}")
                message = self._encode(tensor, "torch")
        return message

    def _encode(self, tensor: torch.Tensor, kernels: str) -> runtime_pb2.Tensor:
        values = tensor.detach()
        payload = _payload_buffer(_HEADER.size + packed_size(values.numel(), self.block_size))
        ctypes.memmove(payload.data_ptr(), _HEADER.pack(MAGIC, self.block_size, values.numel()), _HEADER.size)
        if values.device.type == "cpu":
            quantize_blockwise(values, self.block_size, mode=kernels, out=payload[_HEADER.size :])
        else:
            payload[_HEADER.size :].copy_(quantize_blockwise(values, self.block_size, mode=kernels))
        return self._message(ctypes.string_at(payload.data_ptr(), payload.numel()), tensor)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        """Decodes a payload of this codec into a CPU tensor of the sent shape and dtype."""
        return _decode(serialized_tensor.buffer, serialized_tensor)


def read_back_problem(decoded: torch.Tensor, values: torch.Tensor, block_size: int, levels: int) -> str | None:
    """What is wrong with a blockwise absmax payload that decodes to `decoded`, or None when each
    finite value reads back within half a code step of its block (absmax / (2 x levels), plus the
    decoded dtype's rounding): the format's own bound."""
    sent = values.detach().reshape(-1).float().cpu()
    got = decoded.reshape(-1).float()
    if got.shape != sent.shape:
        return f"it decodes to {got.numel()} values, not {sent.numel()}"
    pad = -sent.numel() % block_size
    blocks = torch.nn.functional.pad(sent, (0, pad)).view(-1, block_size)
    finite = blocks.isfinite().all(dim=1, keepdim=True)  # a block with inf or NaN has no scale to hold to
    step = blocks.abs().amax(dim=1, keepdim=True) / levels
    allowed = step * (0.5 + 1e-3) + blocks.abs() * torch.finfo(decoded.dtype).eps
    error = torch.nn.functional.pad(got - sent, (0, pad)).view(-1, block_size).abs()
    wrong = (~(error <= allowed) & finite).sum().item()
    if wrong:
        worst = torch.where(finite, error / step.clamp_min(torch.finfo(torch.float32).tiny), 0.0).max().item()
        return f"{wrong} of {sent.numel()} values off by up to {worst:.3g} code steps"
    return None


def _payload_buffer(size: int) -> torch.Tensor:
    """A CPU uint8 tensor of size bytes to assemble a payload in. Up to _SCRATCH_LIMIT it is one
    buffer per thread, reused across calls: a fresh allocation of several MB costs page faults
    that took as long as quantising into it."""
    if size > _SCRATCH_LIMIT:
        return _empty_on_huge_pages(size, torch.uint8)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _scratch.buffer = _empty_on_huge_pages(size, torch.uint8)
    return buffer[:size]


def is_starling_payload(buffer: bytes) -> bool:
    """Whether a BLOCKWISE_8BIT buffer holds this codec's format rather than bitsandbytes'."""
    return len(buffer) >= _HEADER.size and buffer[:4] == MAGIC and buffer[4:8] != b"\x00\x00\x00\x00"


def _decode(buffer: bytes, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
    if not is_starling_payload(buffer):
        raise ValueError("not a Starling 8-bit blockwise payload (bad header)")
    _, block_size, numel = _HEADER.unpack_from(buffer)
    shape = torch.Size(serialized_tensor.size)
    if shape.numel() != numel or len(buffer) != _HEADER.size + packed_size(numel, block_size):
        raise ValueError(
            f"payload of {len(buffer)} bytes for {numel} values (block size {block_size}) "
            f"does not match the shape {tuple(shape)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=getattr(torch, serialized_tensor.dtype))
    packed = torch.frombuffer(buffer, dtype=torch.uint8, offset=_HEADER.size)
    dtype = getattr(torch, serialized_tensor.dtype)
    values = dequantize_blockwise(packed, numel, block_size, dtype=dtype, out=_empty_on_huge_pages(numel, dtype))
    return values.view(shape).requires_grad_(serialized_tensor.requires_grad)


def _empty_on_huge_pages(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor to write once. One of over 32 MiB comes from mmap, fresh every
    time, and its first write faults once per 4 KiB page: filling 40 MB took 29 ms here. Asking
    the kernel for transparent huge pages (madvise, where Linux allows it) took that to 9 ms, and
    halved the time to decode 10 M and 100 M values."""
    out = torch.empty(numel, dtype=dtype)
    size = out.numel() * out.element_size()
    start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (out.data_ptr() + size) // _HUGE_PAGE * _HUGE_PAGE
    if _LIBC is not None and size > _MMAPPED_SIZE and end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)  # a hint: errors ignored
    return out


class _Blockwise8BitEntry(Blockwise8Bit):
    """hivemind's BLOCKWISE_8BIT registry entry after register(): a Blockwise8Bit that also hands
    payloads not in its format to the entry it replaced."""

    def __init__(self, previous: CompressionBase):  # no register(): this is what it installs
        self.block_size = BLOCK_SIZE
        self.previous = previous

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer  # each read of the field copies it: read it once
        if is_starling_payload(buffer):
            return _decode(buffer, serialized_tensor)
        return self.previous.extract(serialized_tensor)


def register() -> None:
    """Lets hivemind's serialize_torch_tensor and deserialize_torch_tensor write and read Starling
    payloads under BLOCKWISE_8BIT and 4-bit ones under UNIFORM_8BIT (idempotent)."""
    previous = serialization._BASE_COMPRESSION_TYPES[_REGISTRY_NAME]
    if not isinstance(previous, _Blockwise8BitEntry):
        serialization._BASE_COMPRESSION_TYPES[_REGISTRY_NAME] = _Blockwise8BitEntry(previous)
    previous = serialization._BASE_COMPRESSION_TYPES[_REGISTRY_NAME_4BIT]
    if not isinstance(previous, _Blockwise4BitEntry):
        serialization._BASE_COMPRESSION_TYPES[_REGISTRY_NAME_4BIT] = _Blockwise4BitEntry(previous)


# ---- 4 bits ---------------------------------------------------------------------------------------

MAGIC_4BIT = b"SB4\x01"
BLOCK_SIZE_4BIT = 64
_LEVELS_4BIT = 7  # signed codes in [-7, 7], stored with an offset of 8 in a nibble
_REGISTRY_NAME_4BIT = runtime_pb2.CompressionType.Name(runtime_pb2.UNIFORM_8BIT)


def quantize_4bit(values: torch.Tensor, block_size: int = BLOCK_SIZE_4BIT) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax float32 [blocks], nibbles uint8 [ceil(n / 2)]) of a tensor's values, flattened.
    Codes are round(x / m * 7) per block of absmax m: re-quantising decoded values gives them back."""
    flat = values.detach().reshape(-1).float()
    numel = flat.numel()
    blocks = -(-numel // block_size)
    padded = torch.zeros(blocks * block_size + (block_size * blocks) % 2)
    padded[:numel] = flat
    grid = padded[: blocks * block_size].view(blocks, block_size)
    absmax = grid.abs().amax(dim=1)
    scale = torch.where(absmax > 0, _LEVELS_4BIT / absmax, torch.zeros_like(absmax))
    codes = torch.zeros(padded.numel(), dtype=torch.uint8)
    codes[: blocks * block_size] = (
        (torch.round(grid * scale[:, None]).clamp_(-_LEVELS_4BIT, _LEVELS_4BIT) + (_LEVELS_4BIT + 1))
        .to(torch.uint8)
        .view(-1)
    )
    codes = codes[: 2 * -(-numel // 2)]
    if codes.numel() > numel:
        codes[numel:] = _LEVELS_4BIT + 1  # the pad decodes to zero
    return absmax, codes[0::2] | (codes[1::2] << 4)


def dequantize_4bit(
    absmax: torch.Tensor, nibbles: torch.Tensor, numel: int, block_size: int = BLOCK_SIZE_4BIT
) -> torch.Tensor:
    """The float32 values [numel] that quantize_4bit encoded."""
    codes = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=1).view(-1)[:numel]
    signed = codes.float() - (_LEVELS_4BIT + 1)
    step = (absmax / _LEVELS_4BIT).repeat_interleave(block_size)[:numel]
    return signed * step


class Blockwise4Bit(_BlockwiseCodec):
    """4-bit blockwise absmax quantisation, for pseudo-gradients sent with error feedback: 4.5 bits
    per value (64-value blocks, a float32 absmax each), relative L2 error about 0.1 on N(0, 1).

    hivemind's compression types are a closed enum, so the codec travels as UNIFORM_8BIT, which
    Starling does not otherwise send; `register()` installs an entry there that reads payloads
    with this header and hands every other one to hivemind's uniform 8-bit decoder.
    Payload: MAGIC_4BIT, block size (uint32), number of values (uint64), little-endian; then the
    float32 absmax of every block; then the codes, two per byte, the first in the low nibble."""

    compression_type = runtime_pb2.UNIFORM_8BIT
    bits, default_block_size = 4, BLOCK_SIZE_4BIT

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        self._check_floating(tensor)
        absmax, nibbles = quantize_4bit(tensor.cpu(), self.block_size)
        header = _HEADER.pack(MAGIC_4BIT, self.block_size, tensor.numel())
        return self._message(header + absmax.numpy().tobytes() + nibbles.numpy().tobytes(), tensor)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return _decode_4bit(serialized_tensor.buffer, serialized_tensor)


def _decode_4bit(buffer: bytes, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
    if len(buffer) < _HEADER.size or buffer[:4] != MAGIC_4BIT:
        raise ValueError("not a Starling 4-bit blockwise payload (bad header)")
    _, block_size, numel = _HEADER.unpack_from(buffer)
    shape = torch.Size(serialized_tensor.size)
    blocks = -(-numel // block_size) if block_size else -1
    if block_size == 0 or shape.numel() != numel or len(buffer) != _HEADER.size + 4 * blocks + -(-numel // 2):
        raise ValueError(
            f"payload of {len(buffer)} bytes for {numel} values (block size {block_size}) "
            f"does not match the shape {tuple(shape)}"
        )
    absmax = (
        torch.frombuffer(buffer, dtype=torch.float32, count=blocks, offset=_HEADER.size) if blocks else torch.empty(0)
    )
    nibbles = (
        torch.frombuffer(buffer, dtype=torch.uint8, offset=_HEADER.size + 4 * blocks)
        if numel
        else torch.empty(0, dtype=torch.uint8)
    )
    values = dequantize_4bit(absmax, nibbles, numel, block_size)
    return (
        values.to(getattr(torch, serialized_tensor.dtype)).view(shape).requires_grad_(serialized_tensor.requires_grad)
    )


class _Blockwise4BitEntry(Blockwise4Bit):
    """hivemind's UNIFORM_8BIT registry entry after register(): Blockwise4Bit for payloads with its
    header, the entry it replaced for the others."""

    def __init__(self, previous: CompressionBase):  # no register(): this is what it installs
        self.block_size = BLOCK_SIZE_4BIT
        self.previous = previous

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        if buffer[:4] == MAGIC_4BIT:
            return _decode_4bit(buffer, serialized_tensor)
        return self.previous.extract(serialized_tensor)
