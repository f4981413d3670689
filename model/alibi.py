"""ALiBi attention biases (BLOOM): a per-head linear penalty on key distance."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes; for head counts that are not powers of two, the extra heads take
    the odd-indexed slopes of the next power of two (as in the ALiBi paper and BLOOM)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base**i for i in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Additive bias [batch, heads, queries, keys] = -slope * (query_pos - key_pos)."""
    distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]
    return -slopes.to(query_positions.device)[None, :, None, None] * distance.to(torch.float32)
