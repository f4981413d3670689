"""Causal self-attention: grouped-query heads, sliding window, RoPE or ALiBi, optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from model import kernels
from model.alibi import alibi_bias, alibi_slopes
from model.config import ModelConfig


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.sliding_window = config.sliding_window
        self.kernels_mode = config.kernels
        # Queries, keys and values in one projection: [q | k | v] along the output dimension.
        self.qkv_proj = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        if config.position_embedding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.num_heads), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        key_padding: torch.Tensor | None,
        positions: torch.Tensor,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """x: [batch, seq, hidden]; rope: (cos, sin) or None; key_padding: [batch, keys] of 1/0 or None;
        positions: [batch, seq] absolute positions of the queries."""
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

        seen_before = 0
        if cache is not None:
            seen_before = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        # A cache may keep only the most recent keys: they end at the current position.
        total = seen_before + seq
        query_index = torch.arange(seen_before, total, device=x.device)
        key_index = torch.arange(total - k.shape[2], total, device=x.device)
        if key_padding is not None:
            key_padding = key_padding[:, -k.shape[2]:]

        window_cuts = self.sliding_window is not None and self.sliding_window < k.shape[2]
        plain_causal = key_padding is None and not window_cuts and self.alibi_slopes is None
        if plain_causal and seq == k.shape[2]:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            mask = attention_mask(query_index, key_index, key_padding, self.sliding_window)
            if self.alibi_slopes is not None:
                key_positions = key_index.expand(batch, -1) if key_padding is None else key_padding.cumsum(-1) - 1
                bias = alibi_bias(self.alibi_slopes, positions, key_positions)
                mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
