"""CausalLM: the decoder-only transformer that every peer trains."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from model import kernels
from model.attention import Attention, sdpa_mask
from model.config import ModelConfig
from model.feed_forward import GeluMLP, SwiGLU
from model.moe import SparseMoE, load_balancing_loss
from model.norms import RMSNorm, make_norm
from model.residual import ResidualProjection
from model.rope import rope_cos_sin


@dataclass
class CausalLMOutput(CausalLMOutputWithPast):
    """Logits (None when training with labels through the fused loss), loss, and for MoE models aux_loss."""

    aux_loss: torch.Tensor | None = None


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers' projections give queries and keys: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.post_attention_norm = make_norm(config)
        if config.is_moe:
            self.mlp = SparseMoE(config)
        elif config.mlp == "swiglu":
            self.mlp = SwiGLU(config)
        else:
            self.mlp = GeluMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.input_norm(x), rope, mask, cache)
        out = self.mlp(self.post_attention_norm(x))
        router_logits = None
        if isinstance(out, tuple):
            out, router_logits = out
        return x + out, router_logits


class CausalLM(PreTrainedModel, GenerationMixin):
    """Decoder-only language model for the Mistral, Mixtral and BLOOM architectures.

    `forward(input_ids, attention_mask=None, labels=None)` returns `.logits` and, given labels
    (usually the input ids themselves; they are shifted inside), `.loss`; MoE models add
    `.aux_loss`, already weighted into `.loss` by `router_aux_loss_coef`.
    """

    config_class = ModelConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = make_norm(config) if config.embedding_layernorm else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        return {"lm_head.weight": "embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)  # see ResidualProjection
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=residual_std if isinstance(module, ResidualProjection) else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, SparseMoE):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=residual_std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        return_logits: bool | None = None,
        **unused,
    ) -> CausalLMOutput:
        """attention_mask: [batch, past + seq], 1 for real tokens and 0 for padding.
        labels: [batch, seq]; label i is the target of position i - 1; -100 is ignored.
        return_logits: defaults to "not (training with labels)": then the loss comes from the
        fused head+loss kernel and the full logits are never materialised."""
        batch, seq = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        seen_before = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(seen_before, seen_before + seq, device=input_ids.device).expand(batch, -1)

        x = self.embed_tokens(input_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        # Positions, rotary tables and the mask are the same in every layer: built once here.
        rope = None
        if self.config.position_embedding == "rope":
            rope = rope_cos_sin(position_ids, self.config.attention_head_dim, self.config.rope_theta, x.dtype)
        mask = sdpa_mask(self.config, position_ids, attention_mask, seen_before, attention_dtype(x))

        router_logits = []
        for layer in self.layers:
            x, layer_router_logits = layer(x, rope, mask, cache)
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
        x = self.norm(x)

        if return_logits is None:
            return_logits = not (self.training and labels is not None)
        logits = loss = aux_loss = None
        if labels is not None:
            targets = labels[:, 1:].reshape(-1)
            if return_logits:
                logits = self.lm_head(x)
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=kernels.IGNORE_INDEX
                )
            else:
                loss = kernels.linear_cross_entropy(
                    x[:, :-1].reshape(-1, x.shape[-1]), self.lm_head.weight, targets, mode=self.config.kernels
                )
        elif return_logits:
            logits = self.lm_head(x)
        if router_logits:
            token_mask = attention_mask[:, -seq:].reshape(-1) if attention_mask is not None else None
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok, token_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return CausalLMOutput(loss=loss, aux_loss=aux_loss, logits=logits, cache=cache if use_cache else None)
