"""Triton runtime shared by the kernel modules: an optional import, a lazy `jit`, device checks.

Kernels are decorated lazily, on their first launch, because `triton.jit` reads
TRITON_INTERPRET when it decorates: importing the model must not fix that choice.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it every operation takes its reference.
    triton = None
    tl = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class LazyKernel:
    """A Triton kernel that `triton.jit` compiles on first launch: `kernel[grid](*args)`."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def compiled(self) -> Any:
        return triton.jit(self.fn)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        return self.compiled[grid]


def jit(fn: Callable[..., None]) -> LazyKernel:
    """Decorator for kernels; they may not call other jitted functions."""
    return LazyKernel(fn)


def check_device(device: torch.device) -> None:
    """Raise a clear error unless Triton can run kernels on tensors of this device."""
    if triton is None:
        raise RuntimeError("kernels='triton' needs the triton package (pip install triton)")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "kernels='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before the first kernel launch, or use kernels='auto'"
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
