"""A coordinator killed while it writes a checkpoint: the previous checkpoint stays loadable and an
interrupted write is never taken for the latest one."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from coordinator.checkpoints import CheckpointStore
from coordinator.harness import ManagedProcess, wait_until

WRITER = Path(__file__).parents[1] / "workers" / "checkpoint_writer.py"
OPTIMIZER_VALUES = 20_000_000  # 80 MB: a write (with fsync) takes a good part of a second
KILLS = 4


def written(folder: Path) -> list[int]:
    path = folder / "written.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def freeze_inside_a_write(writer: subprocess.Popen, checkpoints: Path) -> None:
    """Stop `writer` at a moment when it has a partial checkpoint on disk, however fast its writes."""
    deadline = time.monotonic() + 120
    while True:
        assert writer.poll() is None and time.monotonic() < deadline, "the writer never started a write"
        if list(checkpoints.glob(f".epoch-*.partial-{writer.pid}")):
            writer.send_signal(signal.SIGSTOP)
            while Path(f"/proc/{writer.pid}/stat").read_text().split(") ")[1][0] != "T":  # stopped by now
                time.sleep(0.001)
            if list(checkpoints.glob(f".epoch-*.partial-{writer.pid}")):  # still inside: frozen there
                return
            writer.send_signal(signal.SIGCONT)
        time.sleep(0.001)


def test_killed_checkpoint_writes_leave_the_previous_checkpoint_loadable(tmp_path):
    chance = random.Random(8)
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    interrupted = 0
    for kill in range(KILLS):
        command = [sys.executable, str(WRITER), str(tmp_path), str(OPTIMIZER_VALUES)]
        writer = ManagedProcess(command, tmp_path / f"writer-{kill}.log")
        done_before = len(written(tmp_path))
        # Kill only after it has written at least once (the condition is only called in this iteration).
        wrote = lambda: len(written(tmp_path)) > done_before  # noqa: B023, E731
        wait_until(wrote, 120, "a checkpoint", alive=[writer], period=0.05)
        if kill % 2:  # somewhere in a later write, its fsync, rename or pruning
            time.sleep(chance.uniform(0.0, 1.5))
        else:  # surely inside a write: frozen while a partial checkpoint is on disk
            freeze_inside_a_write(writer.process, tmp_path / "checkpoints")
        writer.kill()  # SIGKILL
        interrupted += bool(list((tmp_path / "checkpoints").glob(".epoch-*")))  # killed inside a write

        last_written = written(tmp_path)[-1]
        latest = store.latest()
        assert latest is not None and latest.epoch >= last_written
        for checkpoint in store.all():  # whatever counts as a checkpoint is complete
            state = CheckpointStore.load(checkpoint)
            assert state.epoch == checkpoint.epoch
            assert all(torch.equal(p, torch.full_like(p, float(checkpoint.epoch))) for p in state.parameters)
            assert torch.equal(state.optimizer_tensors[0], torch.full((OPTIMIZER_VALUES,), float(checkpoint.epoch)))
    assert interrupted >= 1, "no kill landed inside a write"
    model = AutoModelForCausalLM.from_pretrained(store.latest().path)
    assert all(torch.equal(p, torch.full_like(p, float(store.latest().epoch))) for p in model.parameters())
    # The next writer clears what the killed ones left behind.
    store.save(CheckpointStore.load(store.latest()), model.config)
    assert not list((tmp_path / "checkpoints").glob(".*")), "leftovers of interrupted writes"
