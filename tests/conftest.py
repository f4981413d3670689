"""Fixtures shared by the test folders: small run configs and peer processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

# Triton kernels run on CPU through the interpreter; Triton reads this when it is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

PEER_WORKER = Path(__file__).parent / "workers" / "peer_worker.py"

RUN_TOML = """\
run_id = "{run_id}"
[model]
preset = "tiny"
[data]
seq_len = {seq_len}
[training]
target_batch_size = {target_batch_size}
warmup_epochs = 0
lr = {lr}
[averaging]
matchmaking_time = {matchmaking_time}
averaging_timeout = 15.0
compression = "{compression}"
average_state_every = {average_state_every}
[coordinator]
checkpoint_every = {checkpoint_every}
auth = "{auth}"
"""


@pytest.fixture
def write_run_config():
    """Write a small run.toml for the tiny model; keyword arguments override the defaults."""

    def write(folder: Path, **overrides) -> Path:
        values = dict(run_id=f"test-{folder.name[-12:].replace('_', '-')}", seq_len=32, target_batch_size=64,
                      lr=1e-3, matchmaking_time=2.0, compression="adaptive-8bit", average_state_every=1,
                      checkpoint_every=10, auth="open")
        values.update(overrides)
        path = folder / "run.toml"
        path.write_text(RUN_TOML.format(**values))
        return path

    return write


class WorkerPeer:
    """A peer_worker.py process and the files it leaves."""

    def __init__(self, folder: Path, spec: dict) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        spec = {**spec, "out": str(folder)}
        (folder / "spec.json").write_text(json.dumps(spec))
        self.log = open(folder / "log.txt", "w")
        # One compute thread per peer: several peers share this machine's cores.
        self.process = subprocess.Popen([sys.executable, str(PEER_WORKER), str(folder / "spec.json")],
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait(self, timeout: float) -> dict:
        code = self.process.wait(timeout=timeout)
        self.log.close()
        assert code == 0, (self.folder / "log.txt").read_text()[-3000:]
        return json.loads((self.folder / "summary.json").read_text())

    def log_text(self) -> str:
        return (self.folder / "log.txt").read_text()

    def params(self) -> dict:
        return load_file(self.folder / "params.safetensors")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


@pytest.fixture
def launch_peer(tmp_path):
    """launch_peer(name, duration=, max_epochs=, slow=, start_after=, snapshots=, **peer_options) -> WorkerPeer."""
    started = []

    def launch(name: str, duration=None, max_epochs=None, slow=None, start_after=None, snapshots=False,
               **options) -> WorkerPeer:
        options = {"batch_size": 4, "host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "name": name, **options}
        worker = WorkerPeer(tmp_path / name, dict(options=options, duration=duration, max_epochs=max_epochs,
                                                        slow=slow, start_after=start_after and str(start_after),
                                                        snapshots=snapshots))
        started.append(worker)
        return worker

    yield launch
    for worker in started:
        worker.kill()
