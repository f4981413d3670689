"""parameter_groups: weight decay on matrices and embeddings only, every tensor once, in model order."""

import pytest
import torch

from model import parameter_groups
from tests.model.test_transformer import ALIBI, tiny

ARCHITECTURES = {"mistral": {}, "mixtral": dict(num_local_experts=3), "bloom": ALIBI}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_matrices_are_decayed_and_the_groups_hold_every_tensor_once_in_model_order(arch):
    model = tiny(**ARCHITECTURES[arch])
    groups = parameter_groups(model.parameters(), 0.1)
    assert {group["weight_decay"] for group in groups} == {0.1, 0.0}

    names = {id(param): name for name, param in model.named_parameters()}  # tied tensors once
    in_groups = [(names[id(param)], group["weight_decay"]) for group in groups for param in group["params"]]
    assert [name for name, _ in in_groups] == list(names.values())  # model order, each once
    for name, decay in in_groups:
        kept = "norm" in name or name.endswith(".bias")
        assert decay == (0.0 if kept else 0.1), name
    # Consecutive groups differ in decay: as few groups as the model's order allows.
    assert all(a["weight_decay"] != b["weight_decay"] for a, b in zip(groups, groups[1:]))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight and ("embed_tokens.weight", 0.1) in in_groups


def test_adamw_step_without_gradient_shrinks_matrices_and_leaves_norms_and_biases():
    model = tiny(**ALIBI)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model.parameters(), 0.5), lr=0.1)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if param.dim() >= 2 else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)
