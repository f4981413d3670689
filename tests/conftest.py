"""Fixtures shared by the test folders: small run configs, peer and coordinator processes."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from coordinator.harness import free_port
from peer.events import read_events

# Triton kernels run on CPU through the interpreter; Triton reads this when it is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

PEER_WORKER = Path(__file__).parent / "workers" / "peer_worker.py"
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


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True, and every process left in its session."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


class WorkerPeer:
    """A peer_worker.py process and the files it leaves; `wrap` prefixes its command line (such as
    `ip netns exec NAMESPACE`, keeping the process id)."""

    def __init__(self, folder: Path, spec: dict, wrap: list[str] | tuple[str, ...] = ()) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        spec = {**spec, "out": str(folder)}
        (folder / "spec.json").write_text(json.dumps(spec))
        self.log = open(folder / "log.txt", "w")
        # One compute thread per peer: several peers share this machine's cores.
        self.process = subprocess.Popen(
            [*wrap, sys.executable, str(PEER_WORKER), str(folder / "spec.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def wait(self, timeout: float) -> dict:
        code = self.process.wait(timeout=timeout)
        self.log.close()
        assert code == 0, (self.folder / "log.txt").read_text()[-3000:]
        return json.loads((self.folder / "summary.json").read_text())

    def log_text(self) -> str:
        return (self.folder / "log.txt").read_text()

    def joined(self) -> bool:
        """Whether a peer launched with hold=True has joined the swarm (and waits to be released)."""
        return (self.folder / "joined").exists()

    def logged_epoch(self) -> int:
        """The latest epoch the peer has reached so far (0 before its first), from its events."""
        return max((e["epoch"] for e in self.events() if e["event"] in ("epoch", "state_loaded")), default=0)

    def params(self) -> dict:
        return load_file(self.folder / "params.safetensors")

    def snapshot_path(self, epoch: int) -> Path:
        """Where the parameters it had on reaching `epoch` are (launched with snapshots=True)."""
        return self.folder / f"epoch-{epoch}.safetensors"

    def snapshot(self, epoch: int) -> dict:
        return load_file(self.snapshot_path(epoch))

    def events(self) -> list[dict]:
        """What the peer has done so far, from its event stream (peer.events)."""
        path = self.folder / "events.jsonl"
        return read_events(path) if path.exists() else []

    def kill(self) -> None:
        """SIGKILL to the worker and whatever of its session is left (hivemind's helper processes)."""
        kill_session(self.process)


@pytest.fixture
def launch_peer(tmp_path):
    """launch_peer(name, duration=, max_epochs=, slow=, start_after=, hold=, snapshots=, die_in_round=,
    drop_reducer_in_round=, model_overrides=, wrap=, **peer_options) -> WorkerPeer (see
    tests/workers/peer_worker.py). A peer launched with hold=True joins, then waits for
    release_peers to start training."""
    started = []

    def launch(
        name: str,
        duration=None,
        max_epochs=None,
        slow=None,
        start_after=None,
        hold=False,
        snapshots=False,
        die_in_round=None,
        drop_reducer_in_round=None,
        model_overrides=None,
        wrap=(),
        **options,
    ) -> WorkerPeer:
        options = {"batch_size": 4, "host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "name": name, **options}
        worker = WorkerPeer(
            tmp_path / name,
            dict(
                options=options,
                duration=duration,
                max_epochs=max_epochs,
                slow=slow,
                start_after=start_after and str(start_after),
                hold_until=str(tmp_path / RELEASE_FILE) if hold else None,
                snapshots=snapshots,
                die_in_round=die_in_round,
                drop_reducer_in_round=drop_reducer_in_round,
                model_overrides=model_overrides,
            ),
            wrap,
        )
        started.append(worker)
        return worker

    yield launch
    for worker in started:
        worker.kill()


@pytest.fixture
def release_peers(tmp_path):
    """release_peers(workers, timeout=): wait until every worker launched with hold=True has joined,
    then let them all start training at once.

    Peers that start training one by one race: the first alone in the swarm takes its epochs without
    averaging (hivemind averages only with more than one peer in the progress records), and with a
    tiny model it can reach a test's last epoch before a slower-starting peer has joined. Even
    released together, a peer counts the others only once they report samples (hivemind's progress
    tracker), so the fastest may still take its first epoch alone: tests that compare parameters
    start one peer and let the others join it (loading its state), as volunteers do."""

    def release(workers: list[WorkerPeer], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not all(worker.joined() for worker in workers):
            for worker in workers:
                assert worker.process.poll() is None, worker.log_text()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for the peers to join"
            time.sleep(0.1)
        (tmp_path / RELEASE_FILE).touch()

    return release


@pytest.fixture
def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    return free_port()


class CoordinatorProcess:
    """A `starling-coordinator` process on loopback with its own state dir, DHT port and dashboard port."""

    def __init__(self, folder: Path, run_toml: Path, dht_port: int, dashboard_port: int) -> None:
        self.folder, self.run_toml = folder, run_toml
        self.state_dir = folder / "state"
        self.dht_port, self.dashboard_port = dht_port, dashboard_port
        self.url = f"http://127.0.0.1:{dashboard_port}"
        self.process = None
        self.starts = 0

    def start(self, timeout: float = 90) -> "CoordinatorProcess":
        self.starts += 1
        self.log = open(self.folder / f"coordinator-{self.starts}.log", "w")
        # A session of its own, so that a SIGKILL can take down its helper processes with it.
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "--config",
                str(self.run_toml),
                "--state-dir",
                str(self.state_dir),
                "--host-maddrs",
                f"/ip4/127.0.0.1/tcp/{self.dht_port}",
                "--dashboard-port",
                str(self.dashboard_port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_text()[-3000:]
            try:
                if self.state()["initial_peers"]:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.log_text()[-3000:])

    def log_text(self) -> str:
        return (self.folder / f"coordinator-{self.starts}.log").read_text()

    @property
    def address(self) -> str:
        return self.state()["initial_peers"][0]

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read()

    def state(self) -> dict:
        return json.loads(self.get("/api/v1/state"))

    def history(self) -> list[dict]:
        return json.loads(self.get("/api/v1/history"))["points"]

    def metrics(self) -> dict[str, list]:
        """Samples of /metrics by metric family name, parsed with prometheus_client's parser."""
        families = text_string_to_metric_families(self.get("/metrics").decode())
        return {family.name: family.samples for family in families}

    def wait_for(self, condition, timeout: float, what: str) -> dict:
        """Poll /api/v1/state until condition(state) holds; returns that state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if condition(state):
                return state
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}; last state: {json.dumps(state)[:3000]}")

    def stop(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self.log.close()
        return code

    def kill(self) -> None:
        if self.process is not None:
            kill_session(self.process)
            self.log.close()


@pytest.fixture
def coordinator(tmp_path):
    """coordinator(run_toml) -> a started CoordinatorProcess; killed at the end of the test."""
    made = []

    def make(run_toml: Path) -> CoordinatorProcess:
        folder = tmp_path / "coordinator"
        folder.mkdir(exist_ok=True)
        process = CoordinatorProcess(folder, run_toml, free_port(), free_port()).start()
        made.append(process)
        return process

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
