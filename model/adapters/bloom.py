"""Adapter for transformers' BloomForCausalLM, both ways."""

from __future__ import annotations

import torch
from transformers import BloomConfig, PretrainedConfig

from model.adapters.key_map import KeyMap
from model.config import ModelConfig

# Fields that BloomConfig and ModelConfig name and mean alike.
SAME_FIELDS = ("vocab_size", "hidden_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def config_from_hf(hf_config: PretrainedConfig) -> ModelConfig:
    return ModelConfig(
        **{name: getattr(hf_config, name) for name in SAME_FIELDS},
        intermediate_size=4 * hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_attention_heads,
        max_position_embeddings=getattr(hf_config, "seq_length", None) or 2048,
        position_embedding="alibi",
        norm="layernorm",
        mlp="gelu",
        attention_bias=True,
        mlp_bias=True,
        embedding_layernorm=True,
        rms_norm_eps=hf_config.layer_norm_epsilon,
    )


def config_to_hf(config: ModelConfig) -> BloomConfig:
    """The BloomConfig of `config`; to_hf checks that BLOOM's fixed choices (ALiBi, LayerNorm, ...) match."""
    return BloomConfig(
        **{name: getattr(config, name) for name in SAME_FIELDS},
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        # BLOOM has no position table; config_from_hf reads the training length back from here.
        seq_length=config.max_position_embeddings,
        layer_norm_epsilon=config.rms_norm_eps,
    )


def key_map(config: ModelConfig) -> KeyMap:
    """How BloomForCausalLM's state dict holds a Starling model's tensors."""
    keys = KeyMap(
        renamed={
            "embed_tokens.weight": "transformer.word_embeddings.weight",
            "embed_norm.weight": "transformer.word_embeddings_layernorm.weight",
            "embed_norm.bias": "transformer.word_embeddings_layernorm.bias",
            "norm.weight": "transformer.ln_f.weight",
            "norm.bias": "transformer.ln_f.bias",
            "lm_head.weight": "lm_head.weight",
        }
    )
    renames = {
        "input_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "attn.o_proj": "self_attention.dense",
        "attn.qkv_proj": "self_attention.query_key_value",
        "mlp.up_proj": "mlp.dense_h_to_4h",
        "mlp.down_proj": "mlp.dense_4h_to_h",
    }
    # BLOOM's fused rows run [heads, (q, k, v), head_dim]; Starling's [(q, k, v), heads, head_dim].
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    qkv_order = torch.arange(3 * heads * head_dim).view(heads, 3, head_dim).transpose(0, 1).flatten()
    for i in range(config.num_hidden_layers):
        for ours, theirs in renames.items():
            for kind in ("weight", "bias"):
                keys.renamed[f"layers.{i}.{ours}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
        for kind in ("weight", "bias"):
            keys.reordered[f"layers.{i}.attn.qkv_proj.{kind}"] = qkv_order
    return keys
