"""The device a peer trains on, and the largest micro-batch that fits it."""

from __future__ import annotations

import logging

import torch

from model import CausalLM
from peer.precision import MixedPrecision

logger = logging.getLogger("starling.peer")

CPU_MICRO_BATCH = 4


def resolve_device(name: str) -> torch.device:
    """'auto' takes the first GPU when there is one; otherwise the named device, checked to exist.
    A CUDA device becomes the process's current one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (use auto, cpu or cuda[:N])") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index is not None:
            # Triton launches its kernels, and libraries allocate, on the current CUDA device: make
            # it this one, or a peer on cuda:1 would run them on GPU 0.
            torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def largest_micro_batch(
    model: CausalLM, seq_len: int, device: torch.device, precision: MixedPrecision, limit: int = 256
) -> int:
    """On CUDA, the largest power-of-two micro-batch whose forward and backward (in the peer's
    precision) fit, found by trying and backing off on out-of-memory; on CPU a fixed small batch."""
    if device.type != "cuda":
        return CPU_MICRO_BATCH
    fits, size = 0, 1
    while size <= limit:
        try:
            batch = torch.zeros(size, seq_len, dtype=torch.long, device=device)
            with precision.autocast():
                model(batch, labels=batch).loss.backward()
            fits, size = size, size * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if fits == 0:
        raise RuntimeError(f"even one sequence of {seq_len} tokens does not fit on {device_name(device)}")
    logger.info("micro-batch %d fits on %s", fits, device_name(device))
    return fits
