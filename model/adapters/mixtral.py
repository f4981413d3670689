"""Adapter for transformers' MixtralForCausalLM (stacked expert weights, transformers 5), both ways."""

from __future__ import annotations

from transformers import MixtralConfig, PretrainedConfig

from model.adapters import mistral
from model.adapters.key_map import KeyMap
from model.config import ModelConfig

# Routing fields that MixtralConfig and ModelConfig name and mean alike.
MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef")


def config_from_hf(hf_config: PretrainedConfig) -> ModelConfig:
    return mistral.config_from_hf(hf_config, **{name: getattr(hf_config, name) for name in MOE_FIELDS})


def config_to_hf(config: ModelConfig) -> MixtralConfig:
    return mistral.config_to_hf(
        config,
        MixtralConfig,
        **{name: getattr(config, name) for name in MOE_FIELDS},
        # Starling always adds the load-balancing loss to the loss; Mixtral only with this on.
        output_router_logits=True,
    )


def key_map(config: ModelConfig) -> KeyMap:
    """How MixtralForCausalLM's state dict holds a Starling model's tensors."""
    keys = mistral.shared_keys(config)
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.mlp.", f"model.layers.{i}.mlp."
        keys.renamed[ours + "router.weight"] = theirs + "gate.weight"
        keys.renamed[ours + "gate_up_proj"] = theirs + "experts.gate_up_proj"
        keys.renamed[ours + "down_proj"] = theirs + "experts.down_proj"
    return keys
