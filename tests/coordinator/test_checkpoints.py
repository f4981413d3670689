"""Checkpoint folders: loadable by transformers, atomic, pruned, and never an interrupted one as latest."""

import torch
from transformers import AutoModelForCausalLM

from coordinator.checkpoints import CheckpointStore, TrainingState
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
