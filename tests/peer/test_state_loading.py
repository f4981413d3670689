"""The checks on a donor's state: what fits this peer's model and optimizer is taken, anything else is
refused with the reason."""

import math

import pytest
import torch

from peer.state_loading import check_metadata_epoch, check_optimizer_metadata, check_tensors, optimizer_state_layout


def adamw_state(shape=(3, 5)) -> tuple[list[torch.Tensor], list[dict], list[torch.Tensor]]:
    """Parameters of a small model, and the flattened state of an AdamW that took one step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape[-1]))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    metadata, tensors = optimizer_state_layout(optimizer)
    return params, metadata, tensors


def test_a_donor_with_the_same_layout_is_taken():
    params, metadata, tensors = adamw_state()
    donor_params, donor_metadata, donor_tensors = adamw_state()
    assert check_tensors([*donor_params, *donor_tensors], [*params, *tensors]) is None
    assert check_optimizer_metadata(donor_metadata, metadata) is None
    assert check_metadata_epoch({"epoch": 7, "optimizer_metadata": donor_metadata}) is None


def test_tensors_of_another_shape_count_or_with_nan_are_refused():
    params, _, tensors = adamw_state()
    other_params, _, other_tensors = adamw_state(shape=(4, 5))
    expected = [*params, *tensors]
    assert check_tensors([*other_params, *other_tensors], expected) == "tensor 0 has shape (4, 5), (3, 5) expected"
    assert check_tensors(expected[:-1], expected) == f"it sent {len(expected) - 1} tensors, {len(expected)} expected"
    poisoned = [tensor.detach().clone() for tensor in expected]
    poisoned[2][0] = math.nan
    assert check_tensors(poisoned, expected) == "tensor 2 holds non-finite values"


@pytest.mark.parametrize(
    "metadata, reason",
    [
        (None, "its metadata is a NoneType, not a dict"),
        ({"epoch": "3"}, "its epoch is '3'"),
        ({"epoch": -1}, "its epoch is -1"),
        ({"epoch": True}, "its epoch is True"),
    ],
)
def test_metadata_without_a_valid_epoch_is_refused(metadata, reason):
    assert check_metadata_epoch(metadata) == reason


def test_optimizer_metadata_of_another_layout_is_refused():
    _, metadata, _ = adamw_state()
    assert "entries" in check_optimizer_metadata(metadata[:-1], metadata)
    lr = next(i for i, entry in enumerate(metadata) if entry == {"type": "value", "value": 1e-3})
    as_text = [*metadata[:lr], {"type": "value", "value": "1e-3"}, *metadata[lr + 1 :]]
    assert (
        check_optimizer_metadata(as_text, metadata) == f"optimizer metadata entry {lr} is '1e-3', like 0.001 expected"
    )
    tensor = next(i for i, entry in enumerate(metadata) if entry["type"] == "tensor")
    moved = [*metadata[:tensor], {"type": "tensor", "index": 99}, *metadata[tensor + 1 :]]
    assert check_optimizer_metadata(moved, metadata) == f"optimizer metadata entry {tensor} points at tensor 99"
    assert "a tensor expected" in check_optimizer_metadata([*metadata[:tensor], 5, *metadata[tensor + 1 :]], metadata)
