"""Triton runtime shared by the kernel modules: an optional import, device checks, tile sizes.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are jitted
then) and when a kernel is decorated: to run the kernels on CPU, set TRITON_INTERPRET=1
before anything imports triton (bitsandbytes and torch._dynamo do).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it every operation takes its reference.
    triton = None
    tl = None


def _imported_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sigmoid, InterpretedFunction) and os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETING = triton is not None and _imported_interpreted()


def jit(fn: Callable[..., None]) -> Callable[..., None]:
    """triton.jit; without triton the function stays plain Python and is never launched."""
    return fn if triton is None else triton.jit(fn)


def interpreting() -> bool:
    """True when triton was imported, and the kernels decorated, under its CPU interpreter."""
    return _INTERPRETING


def check_device(device: torch.device) -> None:
    """Raise a clear error unless Triton can run kernels on tensors of this device."""
    if triton is None:
        raise RuntimeError("kernels='triton' needs the triton package (pip install triton)")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "kernels='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported, or use kernels='auto'"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"kernels='triton' supports CUDA tensors (and CPU under the interpreter), not {device.type}")


def cuda_available() -> bool:
    """True when Triton can compile for CUDA devices in this process."""
    return triton is not None and not interpreting()


@functools.cache
def program_count(device: torch.device) -> int:
    """How many programs a persistent kernel should launch: one per SM on a GPU, a few when interpreted."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def elements_per_program() -> int:
    """Tile size in elements: larger when interpreted, where each program costs the same whatever its size."""
    return 1 << 16 if interpreting() else 1 << 12


def rows_per_program(rows: int, block_cols: int) -> int:
    """A power-of-two row count so that a [rows, block_cols] tile stays near elements_per_program()."""
    return max(1, min(triton.next_power_of_2(rows), elements_per_program() // block_cols))
