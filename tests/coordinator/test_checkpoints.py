"""Checkpoint folders: loadable by transformers, atomic, pruned, and never an interrupted one as latest."""

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from coordinator.checkpoints import CheckpointStore, TrainingState, _exchange
from model import CausalLM, ModelConfig


def state_of(model: CausalLM, epoch: int) -> TrainingState:
    optimizer_tensors = [torch.full((3,), float(epoch)), torch.arange(5.0)]
    metadata = [{"type": "tensor", "index": 0}, {"type": "value", "value": 0.5}, {"type": "tensor", "index": 1}]
    return TrainingState(epoch, [p.detach().clone() for p in model.parameters()], optimizer_tensors, metadata)


def test_checkpoints_load_with_transformers_keep_the_last_k_and_skip_partial_ones(tmp_path):
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = CausalLM(config)
    store = CheckpointStore(tmp_path, keep=2)
    for epoch in (2, 4, 6):
        store.save(state_of(model, epoch), config)
    (tmp_path / ".epoch-000008.partial-999").mkdir()  # a write that was interrupted
    assert [c.epoch for c in store.all()] == [4, 6] and store.latest().epoch == 6

    loaded = AutoModelForCausalLM.from_pretrained(store.latest().path)
    for (name, expected), actual in zip(model.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    resumed = CheckpointStore.load(store.latest())
    assert resumed.epoch == 6 and resumed.optimizer_metadata[1] == {"type": "value", "value": 0.5}
    torch.testing.assert_close(resumed.optimizer_tensors[0], torch.full((3,), 6.0))
    assert len(resumed.parameters) == len(list(model.parameters()))


def test_a_second_write_of_an_epoch_replaces_the_first_in_one_step(tmp_path):
    config = ModelConfig.from_preset("tiny")
    model = CausalLM(config)
    store = CheckpointStore(tmp_path, keep=2)
    store.save(state_of(model, 3), config)
    first = (tmp_path / "epoch-000003").stat().st_ino
    newer = state_of(model, 3)
    newer.optimizer_tensors[0] = torch.full((3,), 7.0)
    store.save(newer, config)
    assert [c.epoch for c in store.all()] == [3] and not list(tmp_path.glob(".*"))
    assert (tmp_path / "epoch-000003").stat().st_ino != first  # the new folder took the old one's place
    torch.testing.assert_close(CheckpointStore.load(store.latest()).optimizer_tensors[0], torch.full((3,), 7.0))
    first, second = tmp_path / "first", tmp_path / "second"  # the swap itself, on this filesystem
    for folder in (first, second):
        folder.mkdir()
        (folder / folder.name).touch()
    assert _exchange(first, second)
    assert [p.name for p in first.iterdir()] == ["second"] and [p.name for p in second.iterdir()] == ["first"]


def test_a_full_or_read_only_disk_fails_the_write_and_keeps_the_previous_checkpoint(small_filesystem):
    config = ModelConfig.from_preset("tiny")
    model = CausalLM(config)
    filesystem = small_filesystem(12 * 1024)  # room for one checkpoint of the tiny model (about 8.5 MB), not two
    store = CheckpointStore(filesystem.path, keep=2)
    store.save(state_of(model, 1), config)

    with pytest.raises((OSError, SafetensorError), match="No space left on device"):
        store.save(state_of(model, 2), config)
    assert not list(filesystem.path.glob(".*")), "the interrupted write was left behind"
    assert [c.epoch for c in store.all()] == [1] and CheckpointStore.load(store.latest()).epoch == 1

    filesystem.remount_read_only()
    with pytest.raises((OSError, SafetensorError), match="Read-only file system"):
        store.save(state_of(model, 2), config)
    assert [c.epoch for c in store.all()] == [1] and CheckpointStore.load(store.latest()).epoch == 1
