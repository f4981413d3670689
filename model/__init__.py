"""Starling's shared language model: Mistral, Mixtral and BLOOM architectures in one implementation."""

from transformers import AutoConfig, AutoModelForCausalLM

from model.config import PRESETS, ModelConfig
from model.transformer import CausalLM, CausalLMOutput
from model.weight_decay import parameter_groups

AutoConfig.register(ModelConfig.model_type, ModelConfig)
AutoModelForCausalLM.register(ModelConfig, CausalLM)

from model.adapters import from_hf, to_hf  # noqa: E402  (needs CausalLM registered first)

__all__ = ["PRESETS", "CausalLM", "CausalLMOutput", "ModelConfig", "from_hf", "parameter_groups", "to_hf"]
