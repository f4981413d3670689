"""State-dict adapter for transformers' MixtralForCausalLM (stacked expert weights, transformers 5)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from model.adapters import mistral
from model.config import ModelConfig


def config_from_hf(hf_config: PretrainedConfig) -> ModelConfig:
    return mistral.config_from_hf(
        hf_config,
        num_local_experts=hf_config.num_local_experts,
        num_experts_per_tok=hf_config.num_experts_per_tok,
        router_aux_loss_coef=hf_config.router_aux_loss_coef,
    )


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = mistral.shared_state_from_hf(hf, config)
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.mlp.", f"layers.{i}.mlp."
        out[dst + "router.weight"] = hf[src + "gate.weight"]
        out[dst + "gate_up_proj"] = hf[src + "experts.gate_up_proj"]
        out[dst + "down_proj"] = hf[src + "experts.down_proj"]
    return out
