"""State-dict adapter for transformers' BloomForCausalLM."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from model.config import ModelConfig


def config_from_hf(hf_config: PretrainedConfig) -> ModelConfig:
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
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
        tie_word_embeddings=hf_config.tie_word_embeddings,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
    )


def _split_fused_qkv(fused: torch.Tensor, num_heads: int) -> torch.Tensor:
    """BLOOM interleaves [q, k, v] per head; ours stacks all q heads, then k, then v."""
    per_head = fused.reshape(num_heads, 3, -1, *fused.shape[1:])
    return per_head.transpose(0, 1).reshape(fused.shape)


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "embed_tokens.weight": hf["transformer.word_embeddings.weight"],
        "embed_norm.weight": hf["transformer.word_embeddings_layernorm.weight"],
        "embed_norm.bias": hf["transformer.word_embeddings_layernorm.bias"],
        "norm.weight": hf["transformer.ln_f.weight"],
        "norm.bias": hf["transformer.ln_f.bias"],
        "lm_head.weight": hf.get("lm_head.weight", hf["transformer.word_embeddings.weight"]),
    }
    renames = {
        "input_layernorm": "input_norm",
        "post_attention_layernorm": "post_attention_norm",
        "self_attention.dense": "attn.o_proj",
        "mlp.dense_h_to_4h": "mlp.up_proj",
        "mlp.dense_4h_to_h": "mlp.down_proj",
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for name, ours in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{ours}.{kind}"] = hf[f"{src}{name}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv_proj.{kind}"] = _split_fused_qkv(
                hf[f"{src}self_attention.query_key_value.{kind}"], config.num_attention_heads
            )
    return out
