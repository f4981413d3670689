"""Causal self-attention: grouped-query heads, sliding window, RoPE or ALiBi, optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from model import kernels
from model.alibi import alibi_bias, alibi_slopes
from model.config import ModelConfig
from model.residual import ResidualProjection


def attention_mask(
    query_index: torch.Tensor, key_index: torch.Tensor, key_padding: torch.Tensor | None, sliding_window: int | None
) -> torch.Tensor:
    """Boolean mask [batch or 1, 1, queries, keys], True where a query may attend.

    A query at absolute index i sees keys j with j <= i and, with a window W, i - j < W
    (the last W tokens, itself included). Padded keys are hidden; every query still sees
    itself, so padded rows never become all-masked (their outputs are ignored).
    """
    distance = query_index[:, None] - key_index[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    return allowed | (distance == 0)[None, None]


def sdpa_mask(
    config: ModelConfig,
    positions: torch.Tensor,
    key_padding: torch.Tensor | None,
    seen_before: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The `attn_mask` that every layer passes to scaled_dot_product_attention, built once per forward.

    positions: [batch, seq] absolute positions of the queries; key_padding: [batch, seen_before + seq]
    of 1/0 or None; seen_before: tokens already in the cache. Returns None for causal attention over
    a fresh sequence (SDPA's `is_causal` path, which lets it pick flash attention), else a boolean
    mask [batch or 1, 1, seq, keys] or, with ALiBi, an additive bias [batch, heads, seq, keys] in
    `dtype` with -inf where masked. Its keys are all seen_before + seq positions; a layer whose cache
    keeps only the most recent keys uses the last columns.
    """
    batch, seq = positions.shape
    total = seen_before + seq
    alibi = config.position_embedding == "alibi"
    window_cuts = config.sliding_window is not None and config.sliding_window < total
    if key_padding is None and not window_cuts and not alibi and seen_before == 0:
        return None
    query_index = torch.arange(seen_before, total, device=positions.device)
    key_index = torch.arange(total, device=positions.device)
    mask = attention_mask(query_index, key_index, key_padding, config.sliding_window)
    if not alibi:
        return mask
    key_positions = key_index.expand(batch, -1) if key_padding is None else key_padding.cumsum(-1) - 1
    bias = alibi_bias(alibi_slopes(config.num_attention_heads), positions, key_positions)
    return bias.masked_fill(~mask, float("-inf")).to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.kernels_mode = config.kernels
        # Queries, keys and values in one projection: [q | k | v] along the output dimension.
        self.qkv_proj = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = ResidualProjection(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """x: [batch, seq, hidden]; rope: (cos, sin) or None; mask: `sdpa_mask`'s, shared by all layers."""
        batch, seq, _ = x.shape
        # Slices rather than split(): the fused rotary kernel rotates q and k in place, which
        # autograd allows on single views but not on the outputs of a multi-view op.
        qkv = self.qkv_proj(x).view(batch, seq, -1, self.head_dim)
        q_end, k_end = self.num_heads, self.num_heads + self.num_kv_heads
        q = qkv[:, :, :q_end].transpose(1, 2)
        k = qkv[:, :, q_end:k_end].transpose(1, 2)
        v = qkv[:, :, k_end:].transpose(1, 2)
        if rope is not None:
            q, k = kernels.rotary(q, k, *rope, mode=self.kernels_mode)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        gqa = self.num_kv_heads != self.num_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # A cache may keep only the most recent keys: they end at the current position.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., -k.shape[2] :], enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
