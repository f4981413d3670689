import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
            [sys.executable, "-m", "coordinator.cli", "--config", str(self.run_toml), "--state-dir", str(self.state_dir),
             "--host-maddrs", f"/ip4/127.0.0.1/tcp/{self.dht_port}", "--dashboard-port", str(self.dashboard_port)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
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
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
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
