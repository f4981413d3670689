"""Robust aggregation for hivemind's all-reduce: CenteredClip in place of the weighted mean.

In a butterfly all-reduce every group member reduces one slice (part) of the gradient: it
receives that part from each sender and hivemind's TensorPartReducer adds them up, weighted by
the senders' sample counts. One sender with non-finite values or gradients scaled by 1e6 then
decides the average of every part. `CenteredClipReducer` reduces each part with CenteredClip
(Karimireddy et al., 2021, as used for collaborative training in Gorbunov et al., "Secure
Distributed Training at Scale", 2022) instead:

1. parts with a non-finite value are left out, with their weight;
2. the centre starts at the coordinate-wise median of the parts;
3. the clipping radius is CLIP_FACTOR times the median distance of the parts from that centre;
4. the centre moves by the weighted mean of the parts' differences from it, each difference
   clipped to the radius, until no part is clipped (or ITERATIONS steps).

When every part lies within the radius of the median, the first step lands on the exact
weighted mean, so honest groups get the plain average. A sender further out moves the result by
at most its weight share times the radius. With one or two finite parts there is no majority to
defend, and the result is their weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import TensorPartReducer

CLIP_FACTOR = 3.0
ITERATIONS = 20


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, clip_factor: float = CLIP_FACTOR,
                  iterations: int = ITERATIONS) -> torch.Tensor:
    """The robust weighted centre of parts [senders, values] (see the module docstring).
    All-NaN when no part with positive weight is finite."""
    keep = parts.isfinite().all(dim=1) & (weights > 0)
    if not keep.any():
        return torch.full(parts.shape[1:], float("nan"), dtype=parts.dtype)
    parts, weights = parts[keep], weights[keep].to(parts.dtype)
    weights = weights / weights.sum()
    if len(parts) <= 2:
        return weights @ parts
    center = parts.median(dim=0).values
    radius = clip_factor * (parts - center).norm(dim=1).median()
    for _ in range(iterations):
        differences = parts - center
        distances = differences.norm(dim=1)
        scale = (radius / distances.clamp_min(torch.finfo(parts.dtype).tiny)).clamp(max=1.0)
        center = center + (weights * scale) @ differences
        if bool((distances <= radius).all()):
            break
    return center


class _PartCollector:
    """Stands in for TensorPartReducer's accumulator: keeps each weighted part as it is added,
    and reduces them with centered_clip where the reducer divides the sum by the total weight."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> "_PartCollector":
        self.parts.append(part.float())
        self.weights.append(alpha)
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        shape = self.parts[0].shape
        stacked = torch.stack([part.reshape(-1) for part in self.parts])
        return centered_clip(stacked, torch.tensor(self.weights)).reshape(shape)


class CenteredClipReducer(TensorPartReducer):
    """hivemind's TensorPartReducer (senders, timeouts, bans) reducing each part with CenteredClip."""

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = _PartCollector()


class CenteredClipAllReduceRunner(AllReduceRunner):
    """hivemind's AllReduceRunner with a CenteredClipReducer for the parts this peer reduces."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain = self.tensor_part_reducer
        plain.finished.set()  # unused: it must not report missing parts when collected
        shapes: Sequence[torch.Size] = plain.part_shapes
        self.tensor_part_reducer = CenteredClipReducer(shapes, plain.num_senders)
