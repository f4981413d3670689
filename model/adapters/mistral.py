"""State-dict adapter for transformers' MistralForCausalLM."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from model.config import ModelConfig


def rope_theta(hf_config: PretrainedConfig) -> float:
    """rope_theta from either the flat field or transformers 5's rope_parameters."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def config_from_hf(hf_config: PretrainedConfig, **extra) -> ModelConfig:
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        max_position_embeddings=hf_config.max_position_embeddings,
        sliding_window=getattr(hf_config, "sliding_window", None),
        rope_theta=rope_theta(hf_config),
        rms_norm_eps=hf_config.rms_norm_eps,
        tie_word_embeddings=hf_config.tie_word_embeddings,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
        **extra,
    )


def shared_state_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Embeddings, norms and attention: the parts Mistral and Mixtral share."""
    out = {
        "embed_tokens.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "input_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "post_attention_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "attn.qkv_proj.weight"] = torch.cat(
            [hf[src + f"self_attn.{name}_proj.weight"] for name in ("q", "k", "v")]
        )
        out[dst + "attn.o_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
    return out


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = shared_state_from_hf(hf, config)
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.mlp.", f"layers.{i}.mlp."
        out[dst + "gate_up_proj.weight"] = torch.cat([hf[src + "gate_proj.weight"], hf[src + "up_proj.weight"]])
        out[dst + "down_proj.weight"] = hf[src + "down_proj.weight"]
    return out
