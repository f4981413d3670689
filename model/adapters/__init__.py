"""from_hf and to_hf: a CausalLM from a transformers Mistral, Mixtral or BLOOM model and back, one adapter per format.

Each adapter module has config_from_hf, config_to_hf and key_map(config), whose KeyMap converts state dicts
both ways.
"""

from __future__ import annotations

import os
from types import ModuleType

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from model.adapters import bloom, mistral, mixtral
from model.config import ModelConfig
from model.transformer import CausalLM

ADAPTERS: dict[str, ModuleType] = {"mistral": mistral, "mixtral": mixtral, "bloom": bloom}


def from_hf(hf_model_or_dir: PreTrainedModel | str | os.PathLike, **config_overrides) -> CausalLM:
    """A CausalLM with the same weights as a transformers model (an instance or a saved directory)."""
    if isinstance(hf_model_or_dir, (str, os.PathLike)):
        path = os.fspath(hf_model_or_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"from_hf: {path!r} is not a directory holding a transformers checkpoint")
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type not in ADAPTERS:
            raise ValueError(
                f"from_hf: unsupported model_type {model_type!r} in {path}; supported: {', '.join(ADAPTERS)}"
            )
        hf_model_or_dir = AutoModelForCausalLM.from_pretrained(path)
    model_type = hf_model_or_dir.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"from_hf: unsupported model_type {model_type!r}; supported: {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[model_type]
    config = adapter.config_from_hf(hf_model_or_dir.config)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.validate_fields()
    model = CausalLM(config)
    state = adapter.key_map(config).from_hf(hf_model_or_dir.state_dict())
    model.load_state_dict(state)
    return model.to(hf_model_or_dir.dtype)


def load_checkpoint(path: str | os.PathLike) -> CausalLM:
    """A checkpoint folder (Starling's own, or a transformers Mistral, Mixtral or BLOOM one) as a
    CausalLM; ValueError naming the folder when it is neither."""
    if checkpoint_config(path).model_type == ModelConfig.model_type:
        return CausalLM.from_pretrained(path)
    return from_hf(path)


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder that load_checkpoint reads, without its weights;
    ValueError naming the folder when it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a transformers checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, ModelConfig):
        return config
    if config.model_type not in ADAPTERS:
        raise ValueError(f"{path}: unsupported model_type {config.model_type!r}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[config.model_type].config_from_hf(config)


def hf_model_type(config: ModelConfig) -> str:
    """The transformers architecture (a key of ADAPTERS) closest to `config`: BLOOM for ALiBi, else
    Mixtral for a mixture of experts, else Mistral. to_hf checks that it expresses every field."""
    if config.position_embedding == "alibi":
        return "bloom"
    return "mixtral" if config.is_moe else "mistral"


def to_hf(model: CausalLM) -> PreTrainedModel:
    """A transformers MistralForCausalLM, MixtralForCausalLM or BloomForCausalLM with the model's
    weights, dtype and device, computing the same logits. Raises ValueError naming the fields that
    architecture cannot express (say, a BLOOM-style model with a sliding window)."""
    config = model.config
    model_type = hf_model_type(config)
    adapter = ADAPTERS[model_type]
    hf_config = adapter.config_to_hf(config)
    expressed = adapter.config_from_hf(hf_config).architecture_fields()
    lost = [f"{name}={value!r}" for name, value in config.architecture_fields().items() if expressed.get(name) != value]
    if lost:
        raise ValueError(f"to_hf: {model_type} cannot express {', '.join(lost)}")
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=model.dtype)
    hf_model.load_state_dict(adapter.key_map(config).to_hf(model.state_dict()))
    return hf_model.to(model.device)
