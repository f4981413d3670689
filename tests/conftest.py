"""Fixtures shared by the test folders: small run configs, peer and coordinator processes."""

import os

# Triton kernels run on CPU through the interpreter; Triton reads this when it is first imported
# (the model imports it: so before any import of the model below).
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from coordinator.harness import LOOPBACK_MADDR, CoordinatorProcess, PeerProcess, PeerSpec, free_port, release  # noqa: E402
from model.data import load_corpus  # noqa: E402
from model.prepared import MANIFEST, Manifest, token_bytes_for, write_atomic, write_shards  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from peer.faults import FaultPlan  # noqa: E402

RELEASE_FILE = "release-held-peers"

RUN_TOML = """\
run_id = "{run_id}"
[model]
preset = "tiny"
[data]
seq_len = {seq_len}
num_shards = {num_shards}
[training]
mode = "{mode}"
optimizer = "{optimizer}"
target_batch_size = {target_batch_size}
warmup_epochs = 0
lr = {lr}
max_grad_norm = {max_grad_norm}
[averaging]
matchmaking_time = {matchmaking_time}
averaging_timeout = 15.0
compression = "{compression}"
average_state_every = {average_state_every}
[coordinator]
checkpoint_every = {checkpoint_every}
auth = "{auth}"
{diloco_section}"""


@pytest.fixture(autouse=True)
def restore_root_logging():
    """Commands run in-process (their main()) set up logging on the test's captured stderr, which
    pytest closes after the test: later records in this process would hit a closed file."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler and handler not in before:  # pytest's own are subclasses
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def write_run_config():
    """Write a small run.toml for the tiny model; keyword arguments override the defaults, and
    diloco={...} makes it a DiLoCo-mode run with those [diloco] keys."""

    def write(folder: Path, diloco: dict | None = None, **overrides) -> Path:
        values = dict(
            run_id=f"test-{folder.name[-12:].replace('_', '-')}",
            seq_len=32,
            target_batch_size=64,
            lr=1e-3,
            num_shards=64,
            matchmaking_time=2.0,
            compression="adaptive-8bit",
            average_state_every=1,
            checkpoint_every=10,
            auth="open",
            mode="batch",
            optimizer="adamw",
            max_grad_norm=1.0,
            diloco_section="",
        )
        if diloco is not None:
            values["mode"] = "diloco"
            values["diloco_section"] = "[diloco]\n" + "".join(
                f"{key} = {json.dumps(value)}\n" for key, value in diloco.items()
            )
        values.update(overrides)
        path = folder / "run.toml"
        path.write_text(RUN_TOML.format(**values))
        return path

    return write


@pytest.fixture
def launch_peer(tmp_path):
    """launch_peer(name, duration=, max_epochs=, faults=, start_after=, hold=, snapshots=, wrap=,
    **peer_options) -> a harness peer (coordinator.harness.PeerProcess) in tmp_path/name, killed at the
    end of the test. `faults` is its declared peer.faults.FaultPlan; a peer launched with hold=True
    joins, then waits for release_peers to start training."""
    started = []

    def launch(
        name: str,
        duration=None,
        max_epochs=None,
        faults: FaultPlan | None = None,
        start_after=None,
        hold=False,
        snapshots=False,
        wrap=(),
        **options,
    ) -> PeerProcess:
        options = {"batch_size": 4, "host_maddrs": [LOOPBACK_MADDR], "name": name, **options}
        spec = PeerSpec(
            options=options,
            duration=duration,
            max_epochs=max_epochs,
            faults=faults,
            start_after=start_after and str(start_after),
            hold_until=str(tmp_path / RELEASE_FILE) if hold else None,
            snapshots=snapshots,
        )
        peer = PeerProcess.harness_peer(tmp_path / name, spec, wrap)
        started.append(peer)
        return peer

    yield launch
    for peer in started:
        peer.kill()


@pytest.fixture
def release_peers(tmp_path):
    """release_peers(peers, timeout=): wait until every peer launched with hold=True has joined,
    then let them all start training at once (coordinator.harness.release).

    Even released together, a peer counts the others only once they report samples (hivemind's
    progress tracker), so the fastest may still take its first epoch alone: tests that compare
    parameters start one peer and let the others join it (loading its state), as volunteers do."""
    return lambda peers, timeout=120: release(peers, tmp_path / RELEASE_FILE, timeout)


@pytest.fixture
def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    return free_port()


@pytest.fixture
def coordinator(tmp_path):
    """coordinator(run_toml, *arguments) -> a started coordinator.harness.CoordinatorProcess (with
    more starling-coordinator arguments); killed at the end of the test."""
    made = []

    def make(run_toml: Path, *arguments: str) -> CoordinatorProcess:
        process = CoordinatorProcess(tmp_path / "coordinator", run_toml, arguments=list(arguments))
        made.append(process)
        return process.start()

    yield make
    for process in made:
        process.kill()


class SmallFilesystem:
    """A tmpfs of a few kilobytes mounted on a folder: a disk that fills up, or turns read-only."""

    def __init__(self, path: Path, kilobytes: int) -> None:
        self.path = path
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")

    def remount_read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_filesystem(tmp_path):
    """small_filesystem(kilobytes) -> a SmallFilesystem under tmp_path; skips where mounting is not allowed."""
    mounted = []

    def make(kilobytes: int) -> SmallFilesystem:
        folder = tmp_path / f"filesystem-{len(mounted)}"
        folder.mkdir()
        filesystem = SmallFilesystem(folder, kilobytes)
        mounted.append(filesystem)
        return filesystem

    yield make
    for filesystem in mounted:
        filesystem.unmount()


CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
    ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Chile", "Santiago"),
    ("Greece", "Athens"), ("Cuba", "Havana"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
]  # fmt: skip


@pytest.fixture
def write_conversations():
    """write_conversations(path, count, seed=) -> path: a .jsonl file of `count` short synthetic
    conversations (capitals and sums, some with a system prompt), the same for the same seed."""

    def write(path: Path, count: int, seed: int = 0) -> Path:
        rng = random.Random(seed)
        lines = []
        for _ in range(count):
            if rng.random() < 0.5:
                country, capital = rng.choice(CAPITALS)
                question, answer = f"What is the capital of {country}?", f"The capital of {country} is {capital}."
            else:
                a, b = rng.randint(1, 49), rng.randint(1, 49)
                question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "Answer in one sentence."})
            lines.append(json.dumps({"messages": messages}))
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
def write_prepared_text():
    """write_prepared_text(folder, sequences, seq_len=, seed=, text=False) -> the sequences: a
    prepared text dataset (model.prepared) of random tokens of the bundled tokenizer (with `text`,
    the first sequences of the bundled corpus), in shards of 4 sequences."""

    def write(folder: Path, sequences: int, seq_len: int = 32, seed: int = 0, text: bool = False) -> torch.Tensor:
        tokenizer = load_tokenizer()
        if text:
            rows = load_corpus(seq_len=seq_len).sequences[:sequences].numpy()
        else:
            rows = np.random.default_rng(seed).integers(0, tokenizer.vocab_size, (sequences, seq_len))
        shards = write_shards(rows, folder, 4, token_bytes_for(tokenizer.vocab_size))
        manifest = Manifest(seq_len, tokenizer.sha256, shards, sequences, rows.size)
        write_atomic(folder / MANIFEST, manifest.to_json().encode())
        return torch.from_numpy(rows)

    return write
