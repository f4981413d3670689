"""Checkpoints of the run: one folder per epoch, written atomically, the last K kept.

A checkpoint folder `epoch-000012/` holds a transformers checkpoint (`config.json`,
`model.safetensors`; loads with `CausalLM.from_pretrained` and `AutoModelForCausalLM.from_pretrained`)
plus the collaborative training state needed to resume the run from it: the optimizer's tensors in
`training_state.safetensors` and its metadata in `training_state.json`. Nothing is pickled.
A folder is written under a temporary name and renamed when complete, so an interrupted write is
never taken for the latest checkpoint. A second write of the same epoch swaps places with the
first in one atomic step (renameat2's RENAME_EXCHANGE, on Linux), so no crash leaves that epoch
without a checkpoint.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import CausalLM, ModelConfig

logger = logging.getLogger("starling.coordinator")

FOLDER = re.compile(r"^epoch-(\d{6,})$")
TRAINING_TENSORS = "training_state.safetensors"
TRAINING_METADATA = "training_state.json"
EVALUATION = "evaluation.json"  # its held-out loss, once the coordinator has measured it (--eval-data)


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap the two paths atomically
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the system or
    the filesystem cannot, and nothing was changed."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside folder durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class Checkpoint:
    epoch: int
    path: Path
    time: float
    size_bytes: int
    evaluation: dict | None = None  # model.evaluate.evaluate's result on the held-out set, once measured

    def as_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "path": str(self.path),
            "time": self.time,
            "size_bytes": self.size_bytes,
            "evaluation": self.evaluation,
        }


@dataclass
class TrainingState:
    """What hivemind's state averagers exchange: parameters (in model.parameters() order), the
    optimizer's flattened tensors, and the metadata that puts them back together."""

    epoch: int
    parameters: list[torch.Tensor]
    optimizer_tensors: list[torch.Tensor]
    optimizer_metadata: list


class CheckpointStore:
    """Checkpoint folders under `root`, keeping the newest `keep`."""

    def __init__(self, root: str | Path, keep: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def all(self) -> list[Checkpoint]:
        found = []
        for path in self.root.iterdir():
            match = FOLDER.match(path.name)
            if match and path.is_dir():
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                found.append(Checkpoint(int(match.group(1)), path, path.stat().st_mtime, size, _evaluation(path)))
        return sorted(found, key=lambda c: c.epoch)

    def latest(self) -> Checkpoint | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: TrainingState, config: ModelConfig) -> Checkpoint:
        """Write `state` as the checkpoint of its epoch; returns it once it is complete on disk."""
        final = self.root / f"epoch-{state.epoch:06d}"
        partial = self.root / f".{final.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        with torch.device("meta"):
            model = CausalLM(config)
        names = [name for name, _ in model.named_parameters()]
        if len(names) != len(state.parameters):
            raise ValueError(f"the state has {len(state.parameters)} parameters, the run's model {len(names)}")
        model.load_state_dict(dict(zip(names, state.parameters)), strict=False, assign=True)
        model.tie_weights()
        try:
            self._write(partial, model, state)
        except BaseException:  # a full disk, say: nothing half-written stays behind taking its space
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if final.exists() and _exchange(partial, final):
            # The new checkpoint of this epoch took the old one's place in one step; the old one is
            # at the temporary name, and no crash can leave the epoch without a checkpoint.
            _fsync_folder(self.root)
            shutil.rmtree(partial, ignore_errors=True)
        else:  # no atomic swap here: the old one is set aside just before the new one comes
            old = self._set_aside(final) if final.exists() else None
            os.replace(partial, final)
            _fsync_folder(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self._prune()
        return next(c for c in self.all() if c.path == final)

    @staticmethod
    def save_evaluation(checkpoint: Checkpoint, evaluation: dict) -> Checkpoint:
        """Keep a checkpoint's held-out evaluation beside it (written atomically)."""
        final = checkpoint.path / EVALUATION
        partial = final.with_name(f".{EVALUATION}.partial-{os.getpid()}")
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(evaluation, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, final)
        _fsync_folder(checkpoint.path)
        return replace(checkpoint, evaluation=evaluation)

    @staticmethod
    def _write(folder: Path, model: CausalLM, state: TrainingState) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        save_file(
            {f"optimizer.{i}": t.contiguous() for i, t in enumerate(state.optimizer_tensors)}, folder / TRAINING_TENSORS
        )
        (folder / TRAINING_METADATA).write_text(
            json.dumps({"epoch": state.epoch, "optimizer_metadata": state.optimizer_metadata, "time": time.time()})
        )
        for file in folder.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())

    def _set_aside(self, folder: Path) -> Path:
        """Rename a checkpoint folder out of the checkpoints' names (atomic); returns its new path."""
        trash = self.root / f".{folder.name}.removed-{os.getpid()}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        return trash

    def _discard(self, folder: Path) -> None:
        """Remove a checkpoint folder: first set aside, so that a crash while deleting its files never
        leaves a half-deleted folder that counts as a checkpoint."""
        shutil.rmtree(self._set_aside(folder), ignore_errors=True)

    def _prune(self) -> None:
        for old in self.all()[: -self.keep]:
            self._discard(old.path)
            logger.info("removed old checkpoint %s", old.path)
        for leftover in [*self.root.glob(".epoch-*.partial-*"), *self.root.glob(".epoch-*.removed-*")]:
            if not leftover.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def load(checkpoint: Checkpoint) -> TrainingState:
        """The training state saved in a checkpoint (parameters in model.parameters() order)."""
        model = CausalLM.from_pretrained(checkpoint.path)
        tensors = load_file(checkpoint.path / TRAINING_TENSORS)
        metadata = json.loads((checkpoint.path / TRAINING_METADATA).read_text())
        return TrainingState(
            epoch=int(metadata["epoch"]),
            parameters=[p.detach() for p in model.parameters()],
            optimizer_tensors=[tensors[f"optimizer.{i}"] for i in range(len(tensors))],
            optimizer_metadata=metadata["optimizer_metadata"],
        )


def _evaluation(folder: Path) -> dict | None:
    """The held-out evaluation kept in a checkpoint folder, if any (one left unreadable counts as none)."""
    try:
        evaluation = json.loads((folder / EVALUATION).read_text())
    except (OSError, ValueError):
        return None
    return evaluation if isinstance(evaluation, dict) else None
