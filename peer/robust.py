"""Robust aggregation for hivemind's all-reduce: CenteredClip in place of the weighted mean.

In a butterfly all-reduce every group member reduces one slice (part) of the gradient: it
receives that part from each sender and hivemind's TensorPartReducer adds them up, weighted by
the senders' sample counts. One sender with non-finite values or gradients scaled by 1e6 then
decides the average of every part. `CenteredClipReducer` reduces each part with CenteredClip
(Karimireddy et al., 2021, as used for collaborative training in Gorbunov et al., "Secure
Distributed Training at Scale", 2022) instead:

1. parts with a non-finite value are left out, with their weight;
2. the centre starts at the medoid: the part with the smallest median distance to the others;
3. the clipping radius is CLIP_FACTOR times the median distance of the parts from that centre;
4. the centre moves by the weighted mean of the parts' differences from it, each difference
   clipped to the radius, until no part is clipped or the centre settles (ITERATIONS at most).

When every part lies within the radius of the medoid, the first step lands on the exact
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
TOLERANCE = 1e-4  # stop once the centre moves by less than this fraction of the radius


def centered_clip(
    parts: Sequence[torch.Tensor], weights: torch.Tensor, clip_factor: float = CLIP_FACTOR, iterations: int = ITERATIONS
) -> torch.Tensor:
    """The robust weighted centre of equally shaped parts (see the module docstring); a tensor
    [senders, values] works as the sequence of its rows. All-NaN when no part with positive
    weight is finite.

    The centre is kept as a combination of the parts (centre = sum of coefficient_i * part_i), so
    every distance comes from the parts' Gram matrix (their pairwise dot products) and the parts
    are combined once, at the end, as hivemind's reducer adds them: no copy of the parts. The
    small matrices are float64, so that a part scaled by 1e6 does not swamp the distances between
    the others. A part whose squared norm overflows float32 counts as not finite."""
    count = len(parts)
    gram = torch.empty(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i + 1):
            gram[i, j] = gram[j, i] = float(torch.dot(parts[i], parts[j]))
    keep = (gram.diagonal().isfinite() & (weights > 0)).tolist()
    kept = [i for i in range(count) if keep[i]]
    if not kept:
        return torch.full_like(parts[0], float("nan"))
    gram, weights = gram[kept][:, kept], weights[kept].double() / weights[kept].double().sum()
    coefficients = weights
    if len(kept) > 2:
        coefficients = _clipped_centre(gram, weights, clip_factor, iterations)
    (first, first_coefficient), *others = zip(kept, coefficients.tolist())
    centre = parts[first] * first_coefficient
    for i, coefficient in others:
        centre.add_(parts[i], alpha=coefficient)
    return centre


def _clipped_centre(gram: torch.Tensor, weights: torch.Tensor, clip_factor: float, iterations: int) -> torch.Tensor:
    """CenteredClip from the medoid, as coefficients over the parts whose Gram matrix is given."""
    squared_norms = gram.diagonal()
    pairwise = squared_norms[:, None] + squared_norms[None, :] - 2 * gram
    coefficients = torch.zeros_like(weights)
    coefficients[pairwise.median(dim=1).values.argmin()] = 1.0  # the medoid
    radius = None
    for _ in range(iterations):
        products = gram @ coefficients
        distances = (squared_norms - 2 * products + coefficients @ products).clamp_min(0).sqrt()
        if radius is None:
            radius = clip_factor * distances.median()
        clipped_weights = weights * (radius / distances.clamp_min(1e-300)).clamp(max=1.0)
        step = clipped_weights - coefficients * clipped_weights.sum()  # sum of w_i s_i (part_i - centre)
        coefficients = coefficients + step
        if bool((distances <= radius).all()) or float(step @ gram @ step) <= (TOLERANCE * float(radius)) ** 2:
            break
    return coefficients


class _PartCollector:
    """Stands in for TensorPartReducer's accumulator: keeps each weighted part as it is added,
    and reduces them with centered_clip where the reducer divides the sum by the total weight."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> _PartCollector:
        self.parts.append(part.float())
        self.weights.append(alpha)
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        shape = self.parts[0].shape
        flat = [part.reshape(-1) for part in self.parts]
        return centered_clip(flat, torch.tensor(self.weights, dtype=torch.float64)).reshape(shape)


class CenteredClipReducer(TensorPartReducer):
    """hivemind's TensorPartReducer (senders, timeouts, bans) reducing each part with CenteredClip."""

    def __init__(self, num_parts: int, num_senders: int) -> None:
        # The parts' shapes only size the zero-filled sum of the base class, which a _PartCollector
        # replaces: empty ones spare a fresh buffer per part (15-20 ms per round of 10 M values).
        super().__init__([torch.Size([0])] * num_parts, num_senders)

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
        self.tensor_part_reducer = CenteredClipReducer(plain.num_parts, plain.num_senders)
