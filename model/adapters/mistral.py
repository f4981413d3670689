"""Adapter for transformers' MistralForCausalLM, both ways."""

from __future__ import annotations

from typing import Any

from transformers import MistralConfig, PretrainedConfig

from model.adapters.key_map import KeyMap
from model.config import ModelConfig

# Fields that MistralConfig, MixtralConfig and ModelConfig name and mean alike.
SAME_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "sliding_window",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def rope_theta(hf_config: PretrainedConfig) -> float:
    """rope_theta from either the flat field or transformers 5's rope_parameters."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def config_from_hf(hf_config: PretrainedConfig, **extra: Any) -> ModelConfig:
    return ModelConfig(
        **{name: getattr(hf_config, name) for name in SAME_FIELDS},
        head_dim=getattr(hf_config, "head_dim", None),
        rope_theta=rope_theta(hf_config),
        **extra,
    )


def config_to_hf(
    config: ModelConfig, config_class: type[PretrainedConfig] = MistralConfig, **extra: Any
) -> PretrainedConfig:
    """The MistralConfig of `config` (or, for Mixtral, a `config_class` with `extra` fields)."""
    return config_class(
        **{name: getattr(config, name) for name in SAME_FIELDS},
        head_dim=config.attention_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        **extra,
    )


def shared_keys(config: ModelConfig) -> KeyMap:
    """Embeddings, norms and attention: the parts Mistral and Mixtral share."""
    keys = KeyMap(
        renamed={
            "embed_tokens.weight": "model.embed_tokens.weight",
            "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight",
        }
    )
    q_rows = config.num_attention_heads * config.attention_head_dim
    kv_rows = config.num_key_value_heads * config.attention_head_dim
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        keys.renamed[ours + "input_norm.weight"] = theirs + "input_layernorm.weight"
        keys.renamed[ours + "post_attention_norm.weight"] = theirs + "post_attention_layernorm.weight"
        keys.renamed[ours + "attn.o_proj.weight"] = theirs + "self_attn.o_proj.weight"
        keys.fused[ours + "attn.qkv_proj.weight"] = [
            (theirs + "self_attn.q_proj.weight", q_rows),
            (theirs + "self_attn.k_proj.weight", kv_rows),
            (theirs + "self_attn.v_proj.weight", kv_rows),
        ]
    return keys


def key_map(config: ModelConfig) -> KeyMap:
    """How MistralForCausalLM's state dict holds a Starling model's tensors."""
    keys = shared_keys(config)
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.mlp.", f"model.layers.{i}.mlp."
        rows = config.intermediate_size
        keys.fused[ours + "gate_up_proj.weight"] = [
            (theirs + "gate_proj.weight", rows),
            (theirs + "up_proj.weight", rows),
        ]
        keys.renamed[ours + "down_proj.weight"] = theirs + "down_proj.weight"
    return keys
