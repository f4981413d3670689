"""The model's single dispatch point for its fused operations.

Each operation has a plain PyTorch reference (the CPU path and the test oracle) beside its
Triton kernel, one module per operation. `mode` is the config's `kernels` field: "torch"
always takes the reference; "auto" takes the Triton kernel for CUDA tensors of a supported
dtype, checked against its reference once per device, dtype and shape class (model.kernels.guard),
and the reference otherwise; "checked" does the same wherever Triton runs (CPU too, under
TRITON_INTERPRET=1); "triton" insists on the kernel, unchecked, and raises a clear error where
it cannot run (no triton package, CPU without TRITON_INTERPRET=1, unsupported dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model.config import KERNEL_CHOICES
from model.kernels import guard
from model.kernels._triton import FLOAT_DTYPES, check_device, cuda_available, interpreting
from model.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy_reference, linear_cross_entropy_triton
from model.kernels.quantize import (
    BLOCK_SIZE,
    dequantize_blockwise_reference,
    dequantize_blockwise_triton,
    packed_size,
    quantize_blockwise_reference,
    quantize_blockwise_triton,
    triton_supports,
)
from model.kernels.rms_norm import rms_norm_reference, rms_norm_triton
from model.kernels.rotary import rotary_reference, rotary_triton
from model.kernels.swiglu import swiglu_reference, swiglu_triton

__all__ = [
    "BLOCK_SIZE",
    "IGNORE_INDEX",
    "dequantize_blockwise",
    "linear_cross_entropy",
    "packed_size",
    "quantize_blockwise",
    "quantize_blockwise_uses_kernel",
    "rms_norm",
    "rotary",
    "swiglu",
]

# The slice of its real inputs on which a kernel is checked (guard.checked): rows of a matrix, or
# values of a flat or elementwise input; odd, so that the kernels' masked tails are exercised too.
PROBE_ROWS = 7
PROBE_VALUES = 1031


def _fused(mode: str, *tensors: torch.Tensor, supported: bool = True) -> bool:
    """Whether to run the Triton kernel on these tensors. `supported` is the operation's own
    shape condition; floating tensors must also share a device and be fp32, fp16 or bf16."""
    if mode not in KERNEL_CHOICES:
        raise ValueError(f"kernels mode must be one of {', '.join(KERNEL_CHOICES)}; got {mode!r}")
    if mode == "torch":
        return False
    device = tensors[0].device
    supported = supported and all(
        t.device == device and (t.dtype in FLOAT_DTYPES or not t.is_floating_point()) for t in tensors
    )
    if mode == "auto":
        return supported and device.type == "cuda" and cuda_available()
    if mode == "checked":
        return supported and (device.type == "cuda" and cuda_available() or device.type == "cpu" and interpreting())
    check_device(device)
    if not supported:
        raise ValueError(
            "kernels='triton': unsupported inputs "
            + ", ".join(f"{t.dtype} {tuple(t.shape)} on {t.device}" for t in tensors)
        )
    return True


def _run(
    mode: str,
    name: str,
    fused: Callable[..., object],
    reference: Callable[..., object],
    inputs: Sequence[torch.Tensor],
    probe_inputs: Sequence[torch.Tensor] | None,
    shape_class: tuple = (),
    **call_options,
):
    """The kernel on `inputs`: as it is under "triton", checked first otherwise (guard.checked)."""
    if mode == "triton":
        return fused(*inputs, **call_options)
    return guard.checked(name, shape_class, fused, reference, inputs, probe_inputs, **call_options)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension (see model.kernels.rms_norm)."""
    supported = weight.shape == x.shape[-1:] and 0 < x.shape[-1] <= 65536 and x.numel() > 0
    if _fused(mode, x, weight, supported=supported):
        return _run(
            mode,
            "rms_norm",
            lambda x, weight: rms_norm_triton(x, weight, eps),
            lambda x, weight: rms_norm_reference(x, weight, eps),
            (x, weight),
            (x.reshape(-1, x.shape[-1])[:PROBE_ROWS], weight),
            shape_class=(x.shape[-1], weight.dtype),
        )
    return rms_norm_reference(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """silu(gate) * up (see model.kernels.swiglu)."""
    supported = gate.shape == up.shape and gate.dtype == up.dtype and gate.numel() > 0
    if _fused(mode, gate, up, supported=supported):
        probe = [t.reshape(-1)[:PROBE_VALUES] for t in (gate, up)]
        return _run(mode, "swiglu", swiglu_triton, swiglu_reference, (gate, up), probe)
    return swiglu_reference(gate, up)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k [batch, heads, seq, head_dim] (see model.kernels.rotary).
    The fused path rotates q and k in place; use the returned tensors."""
    supported = (
        q.dim() == 4
        and k.dim() == 4
        and q.shape[0] == k.shape[0]
        and q.shape[2:] == k.shape[2:]
        and q.numel() > 0
        and cos.shape == sin.shape == (cos.shape[0], q.shape[2], q.shape[3])
        and cos.shape[0] in (1, q.shape[0])
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and not (cos.requires_grad or sin.requires_grad)
    )
    if _fused(mode, q, k, cos, sin, supported=supported):
        probe = (q[:1, :1], k[:1, :1], cos[:1], sin[:1])
        return _run(mode, "rotary", rotary_triton, rotary_reference, (q, k, cos, sin), probe, shape_class=q.shape[2:])
    return rotary_reference(q, k, cos, sin)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    mode: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of hidden @ weight.T against labels (see model.kernels.cross_entropy);
    the fused path never materialises the [tokens, vocab] logits."""
    supported = (
        hidden.dim() == 2
        and weight.dim() == 2
        and hidden.shape[1] == weight.shape[1]
        and labels.shape == hidden.shape[:1]
        and hidden.dtype == weight.dtype
        and hidden.shape[0] > 0
    )
    if _fused(mode, hidden, weight, labels, supported=supported):
        return _run(
            mode,
            "linear_cross_entropy",
            lambda hidden, weight, labels: linear_cross_entropy_triton(hidden, weight, labels, ignore_index),
            lambda hidden, weight, labels: linear_cross_entropy_reference(hidden, weight, labels, ignore_index),
            (hidden, weight, labels),
            (hidden[:PROBE_ROWS], weight, labels[:PROBE_ROWS]),
            shape_class=tuple(weight.shape),
        )
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index)


def quantize_blockwise(
    x: torch.Tensor, block_size: int = BLOCK_SIZE, mode: str = "auto", out: torch.Tensor | None = None
) -> torch.Tensor:
    """x read flat, as packed 8-bit blockwise codes (layout in model.kernels.quantize), written
    into out (a contiguous uint8 tensor of packed_size bytes on x's device) when given."""
    if _fused(mode, x, supported=triton_supports(block_size)):
        return _run(
            mode,
            "quantize_blockwise",
            lambda x, out=None: quantize_blockwise_triton(x, block_size, out),
            lambda x, out=None: quantize_blockwise_reference(x, block_size, out),
            (x,),
            (x.reshape(-1)[:PROBE_VALUES],),
            shape_class=(block_size,),
            out=out,
        )
    return quantize_blockwise_reference(x, block_size, out)


def quantize_blockwise_uses_kernel(x: torch.Tensor, block_size: int = BLOCK_SIZE, mode: str = "auto") -> bool:
    """Whether quantize_blockwise(x, block_size, mode) runs the Triton kernel (unless the guard has
    replaced it) rather than the reference."""
    return _fused(mode, x, supported=triton_supports(block_size))


def dequantize_blockwise(
    packed: torch.Tensor,
    numel: int,
    block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    mode: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The flat tensor of numel values that quantize_blockwise packed, written into out (a contiguous
    flat tensor of numel values of dtype on packed's device) when given."""
    if _fused(mode, packed, supported=triton_supports(block_size) and dtype in FLOAT_DTYPES):
        return _run(
            mode,
            "dequantize_blockwise",
            lambda packed, out=None: dequantize_blockwise_triton(packed, numel, block_size, dtype, out),
            lambda packed, out=None: dequantize_blockwise_reference(packed, numel, block_size, dtype, out),
            (packed,),
            None,  # checked on the whole payload, once per block size and dtype
            shape_class=(block_size, dtype),
            out=out,
        )
    return dequantize_blockwise_reference(packed, numel, block_size, dtype, out)
