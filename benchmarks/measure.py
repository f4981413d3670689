"""Timing and memory measurement shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hivemind.compression import CompressionBase

RESULTS = Path(__file__).parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    steps: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each step, timed in interleaved rounds so that a change in machine
    load affects all of them alike (their ratios are measured side by side)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes that autograd keeps for the backward pass during step() (distinct storages)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def peak_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak allocated device memory during step() above what was allocated before; None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def codec_table() -> dict[str, Callable[[], CompressionBase]]:
    """The codecs the benchmarks compare (benchmarks/codecs.py, benchmarks/allreduce.py), by short
    name: hivemind's and Starling's 8-bit blockwise one (peer.codec). Imported here rather than above:
    the other benchmarks that use this module need no hivemind."""
    from hivemind.compression import (
        BlockwiseQuantization,
        Float16Compression,
        NoCompression,
        Quantile8BitQuantization,
        ScaledFloat16Compression,
        Uniform8BitQuantization,
    )

    from peer.codec import Blockwise8Bit

    return {
        "none": NoCompression,
        "fp16": Float16Compression,
        "scaled-fp16": ScaledFloat16Compression,
        "uniform8": Uniform8BitQuantization,
        "quantile8": Quantile8BitQuantization,
        "blockwise8": BlockwiseQuantization,
        "starling8": Blockwise8Bit,
    }
