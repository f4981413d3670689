"""parameter_groups: weight decay on matrices and embeddings only, every tensor once, in model order."""

import pytest
import torch

from model import parameter_groups
from tests.model.test_transformer import ALIBI, tiny

ARCHITECTURES = {"mistral": {}, "mixtral": dict(num_local_experts=3), "bloom": ALIBI}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_matrices_are_decayed_and_every_tensor_appears_once_in_model_order(arch):
    model = tiny(**ARCHITECTURES[arch])
    decay, no_decay = parameter_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)

    names = {id(param): name for name, param in model.named_parameters()}  # tied tensors once
    decayed = [names[id(param)] for param in decay["params"]]
    kept = [names[id(param)] for param in no_decay["params"]]
    assert all("norm" in name or name.endswith(".bias") for name in kept)
    assert not any("norm" in name or name.endswith(".bias") for name in decayed)
    assert sorted(decayed + kept) == sorted(names.values())
    order = list(names.values())
    assert decayed == sorted(decayed, key=order.index) and kept == sorted(kept, key=order.index)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight and "embed_tokens.weight" in decayed


def test_adamw_step_without_gradient_shrinks_matrices_and_leaves_norms_and_biases():
    model = tiny(**ALIBI)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.5), lr=0.1)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if param.dim() >= 2 else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)
