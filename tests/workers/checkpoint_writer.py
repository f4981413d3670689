"""Writes checkpoints until killed, as the coordinator does: each epoch twice (the second write
replaces the first), then the next epoch. The tiny model's parameters are filled with the epoch,
the optimizer state is large enough that a write takes a while.

    checkpoint_writer.py FOLDER OPTIMIZER_VALUES

After each completed write it appends the epoch to FOLDER/written.txt.
"""

import sys
from pathlib import Path

import torch

from coordinator.checkpoints import CheckpointStore, TrainingState
from model import CausalLM, ModelConfig


def main() -> None:
    folder, optimizer_values = Path(sys.argv[1]), int(sys.argv[2])
    config = ModelConfig.from_preset("tiny")
    parameters = [p.detach() for p in CausalLM(config).parameters()]
    store = CheckpointStore(folder / "checkpoints", keep=2)
    latest = store.latest()
    epoch = latest.epoch + 1 if latest else 1
    while True:
        for _ in range(2):
            state = TrainingState(
                epoch,
                [torch.full_like(p, float(epoch)) for p in parameters],
                [torch.full((optimizer_values,), float(epoch))],
                [{"type": "tensor", "index": 0}],
            )
            store.save(state, config)
            with open(folder / "written.txt", "a") as log:
                log.write(f"{epoch}\n")
        epoch += 1


if __name__ == "__main__":
    main()
