"""A smaller student cut out of a parent, as Minitron and Ministral 3's cascade distillation start:
keep the parent's most important layers, MLP channels and hidden dimensions, judged by activations
on a calibration batch, and copy their weights.

- Layers: a block's importance is how much it changes the residual stream, 1 - cos(input, output)
  averaged over tokens (ShortGPT's block influence); the most important keep their order.
- MLP channels, per layer: the mean magnitude of the activation that enters the down projection.
- Hidden dimensions: the mean magnitude of each channel at the output of every norm (the inputs of
  attention, of the MLP and of the head), summed over them.
Attention heads are kept whole, and head_dim is fixed to the parent's so that they fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.transformer import CausalLM


@dataclass
class Importance:
    layers: torch.Tensor  # [num_hidden_layers]
    channels: list[torch.Tensor]  # per layer: [intermediate_size]
    hidden: torch.Tensor  # [hidden_size]


@torch.no_grad()
def importance(model: CausalLM, batch: torch.Tensor) -> Importance:
    """The parent's activation statistics on a calibration batch of token ids [batch, seq]."""
    config = model.config
    layers = torch.zeros(config.num_hidden_layers)
    channels = [torch.zeros(config.intermediate_size) for _ in range(config.num_hidden_layers)]
    hidden = torch.zeros(config.hidden_size)
    hooks = []

    def block_influence(index: int):
        def hook(module, args, output):
            before, after = args[0].float(), output[0].float()
            layers[index] += (1 - F.cosine_similarity(before, after, dim=-1)).mean()

        return hook

    def channel_magnitude(index: int):
        def hook(module, args):
            channels[index] += args[0].float().abs().mean(dim=(0, 1))

        return hook

    def norm_output(module, args, output):
        hidden.add_(output.float().abs().mean(dim=(0, 1)))

    for index, block in enumerate(model.layers):
        hooks.append(block.register_forward_hook(block_influence(index)))
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(channel_magnitude(index)))
        for norm in (block.input_norm, block.post_attention_norm):
            hooks.append(norm.register_forward_hook(norm_output))
    hooks.append(model.norm.register_forward_hook(norm_output))
    try:
        model.eval()(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return Importance(layers, channels, hidden)


def check_prunable(config: ModelConfig, layers: int, intermediate_size: int, hidden_size: int) -> None:
    """ValueError naming what cannot be pruned so."""
    if config.is_moe:
        raise ValueError("pruning takes dense models; this one is a mixture of experts")
    for name, target, parent in (
        ("--layers", layers, config.num_hidden_layers),
        ("--intermediate-size", intermediate_size, config.intermediate_size),
        ("--hidden-size", hidden_size, config.hidden_size),
    ):
        if not 1 <= target <= parent:
            raise ValueError(f"{name} {target} must be between 1 and the parent's {parent}")


def pruned_config(config: ModelConfig, layers: int, intermediate_size: int, hidden_size: int) -> ModelConfig:
    values = config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "torch_dtype", "dtype"):
        values.pop(key, None)
    values.update(
        num_hidden_layers=layers,
        intermediate_size=intermediate_size,
        hidden_size=hidden_size,
        head_dim=config.attention_head_dim,  # heads are kept whole
    )
    return ModelConfig(**values)


@torch.no_grad()
def prune(model: CausalLM, batch: torch.Tensor, layers: int, intermediate_size: int, hidden_size: int) -> CausalLM:
    """The student: the parent's most important `layers` blocks, `intermediate_size` MLP channels of
    each and `hidden_size` hidden dimensions (by `importance` on the calibration batch)."""
    config = model.config
    check_prunable(config, layers, intermediate_size, hidden_size)
    scores = importance(model, batch)
    kept_layers = scores.layers.topk(layers).indices.sort().values.tolist()
    hidden = scores.hidden.topk(hidden_size).indices.sort().values
    channels = [scores.channels[i].topk(intermediate_size).indices.sort().values for i in range(len(model.layers))]

    student = CausalLM(pruned_config(config, layers, intermediate_size, hidden_size))
    parent = model.state_dict()
    state = {}
    for name in student.state_dict():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        source = name if match is None else f"layers.{kept_layers[int(match[1])]}.{match[2]}"
        layer = None if match is None else kept_layers[int(match[1])]
        state[name] = _slice(source, parent[source], hidden, None if layer is None else channels[layer], config)
    student.load_state_dict(state)
    return student


def _slice(
    name: str, tensor: torch.Tensor, hidden: torch.Tensor, channels: torch.Tensor | None, config: ModelConfig
) -> torch.Tensor:
    """A parent parameter cut to the kept hidden dimensions and MLP channels."""
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return tensor[:, hidden]
    if re.search(r"norm\.(weight|bias)$", name):
        return tensor[hidden]
    if name.endswith("attn.qkv_proj.weight"):
        return tensor[:, hidden]
    if name.endswith("attn.qkv_proj.bias"):
        return tensor
    if name.endswith(("attn.o_proj.weight", "mlp.down_proj.weight")):
        rows = tensor[hidden]
        return rows if "attn" in name else rows[:, channels]
    if name.endswith(("attn.o_proj.bias", "mlp.down_proj.bias")):
        return tensor[hidden]
    if name.endswith(("mlp.gate_up_proj.weight", "mlp.gate_up_proj.bias")):
        rows = torch.cat([channels, channels + config.intermediate_size])  # [gate | up]
        return tensor[rows][:, hidden] if tensor.dim() == 2 else tensor[rows]
    if name.endswith(("mlp.up_proj.weight", "mlp.up_proj.bias")):
        return tensor[channels][:, hidden] if tensor.dim() == 2 else tensor[channels]
    raise ValueError(f"pruning does not know how to cut {name}")
