"""The arithmetic a peer trains in, chosen by what its device supports, and fp16's loss scaling.

bf16 autocast on GPUs that support it, fp16 autocast with dynamic loss scaling on those that do not
(a T4 or P100: fp16's range is too small for raw gradients), fp32 on CPU. Whatever the precision,
the gradients a peer contributes are unscaled and in fp32 before they reach the optimizer's
accumulators, and so before the codec: peers of different precisions average together.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from peer.options import PRECISIONS

logger = logging.getLogger("starling.peer")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(requested: str, device: torch.device) -> str:
    """The precision for `requested` (one of PRECISIONS) on `device`; ValueError naming the option
    when the device cannot run it."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision {requested}: choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return "bf16" if bf16 else "fp16"
    if requested == "bf16" and not bf16:
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 arithmetic (use fp16)")
    return requested


class MixedPrecision:
    """Autocast and, in fp16, a dynamic loss scale kept per micro-batch: a micro-batch whose scaled
    gradients overflow is skipped (not contributed) and the scale halves; after `growth_interval`
    micro-batches without overflow it doubles. (hivemind's GradScaler unscales once per epoch, at
    the collaborative step: one overflowing micro-batch would spoil every gradient the peer had
    accumulated in that epoch. Unscaling each micro-batch before it is accumulated loses only it.)"""

    INITIAL_SCALE = 2.0**16
    GROWTH_INTERVAL = 2000

    def __init__(self, precision: str, device: torch.device, initial_scale: float | None = None) -> None:
        self.precision = precision
        self.device = device
        self.scaling = precision == "fp16"
        self.loss_scale = (initial_scale or self.INITIAL_SCALE) if self.scaling else 1.0
        self.overflows = 0  # fp16 micro-batches skipped because their scaled gradients overflowed
        self._since_overflow = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision not in AUTOCAST_DTYPES:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        """Backward from the loss, scaled in fp16."""
        (loss * self.loss_scale if self.scaling else loss).backward()

    def unscale(self, grads: list[torch.Tensor]) -> None:
        """Divide the gradients by the loss scale, in place (they are fp32: autocast keeps the
        parameters, and so their gradients, in fp32)."""
        if self.scaling and grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scale)

    def update(self, overflowed: bool) -> None:
        """After a micro-batch's gradients were unscaled and checked: adapt the scale."""
        if not self.scaling:
            return
        if overflowed:
            self.overflows += 1
            self._since_overflow = 0
            self.loss_scale /= 2
            logger.debug("fp16 gradients overflowed: micro-batch skipped, loss scale now %g", self.loss_scale)
            return
        self._since_overflow += 1
        if self._since_overflow == self.GROWTH_INTERVAL:
            self._since_overflow = 0
            self.loss_scale *= 2
