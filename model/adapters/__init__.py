"""from_hf: build a CausalLM from a transformers Mistral, Mixtral or BLOOM model, one adapter per format."""

from __future__ import annotations

import os
from types import ModuleType

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from model.adapters import bloom, mistral, mixtral
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
            raise ValueError(f"from_hf: unsupported model_type {model_type!r} in {path}; supported: {', '.join(ADAPTERS)}")
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
    state = adapter.state_dict_from_hf(hf_model_or_dir.state_dict(), config)
    model.load_state_dict(state)
    return model.to(hf_model_or_dir.dtype)
