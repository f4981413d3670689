"""ModelConfig: presets with the originals' exact parameter counts, and clear errors for bad fields."""

import pytest
import torch

from model import CausalLM, ModelConfig

ORIGINAL_PARAMETER_COUNTS = {
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "bloom-560m": 559_214_592,
}


@pytest.mark.parametrize("preset, expected", ORIGINAL_PARAMETER_COUNTS.items())
def test_preset_on_meta_device_has_the_original_parameter_count(preset, expected):
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_demo_preset_size():
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_preset("demo"))
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 30e6


def test_overrides_apply():
    config = ModelConfig.from_preset("tiny", num_hidden_layers=3, kernels="torch")
    assert config.num_hidden_layers == 3 and config.kernels == "torch"


@pytest.mark.parametrize(
    "fields, culprit",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(kernels="cuda"), "kernels"),
        (dict(hidden_size=-8), "hidden_size"),
        (dict(position_embedding="learned"), "position_embedding"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(hidden_size=66, num_attention_heads=4), "hidden_size"),
    ],
)
def test_inconsistent_fields_raise_value_error_naming_the_field(fields, culprit):
    with pytest.raises(ValueError, match=culprit):
        ModelConfig.from_preset("tiny", **fields)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'llama-9000'"):
        ModelConfig.from_preset("llama-9000")
