"""A whole run on this machine: a coordinator and two peers training the demo model on the bundled corpus.

    python -m coordinator.demo [--duration SECONDS] [--peers N] [--dashboard-port PORT]

Prints the dashboard URL and the join command, runs until Ctrl-C (or --duration), then stops every
process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

STARTUP_TIMEOUT = 120.0
STOP_GRACE = 30.0


def launch(args: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    # Each in a session of its own so that stopping it reaches its helper processes too.
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for_state(url: str, coordinator: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if coordinator.poll() is not None:
            sys.exit(f"demo: the coordinator stopped; see {log}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "api/v1/state", timeout=5) as response:
                state = json.loads(response.read())
            if state["initial_peers"]:
                return state
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"demo: the coordinator did not start within {STARTUP_TIMEOUT:.0f} s; see {log}")


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of its session is left
        except ProcessLookupError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("DURATION") or 0) or None,
        help="stop after this many seconds (default: until Ctrl-C; also DURATION=)",
    )
    parser.add_argument("--peers", type=int, default=2, help="peers to start")
    parser.add_argument("--dashboard-port", type=int, default=8080)
    parser.add_argument("--state-dir", default="runs/demo", help="coordinator state, checkpoints and logs")
    args = parser.parse_args()

    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    config = resources.files("coordinator") / "run.example.toml"
    url = f"http://127.0.0.1:{args.dashboard_port}/"
    processes = [
        launch(
            [
                "coordinator.cli",
                "--config",
                str(config),
                "--state-dir",
                str(state_dir),
                "--dashboard-port",
                str(args.dashboard_port),
            ],
            state_dir / "coordinator.log",
        )
    ]
    try:
        state = wait_for_state(url, processes[0], state_dir / "coordinator.log")
        for index in range(args.peers):
            name = f"demo-peer-{index + 1}"
            processes.append(
                launch(
                    [
                        "peer.cli",
                        "--initial-peers",
                        *state["initial_peers"],
                        "--name",
                        name,
                        "--host-maddrs",
                        "/ip4/127.0.0.1/tcp/0",
                        "--batch-size",
                        "4",
                    ],
                    state_dir / f"{name}.log",
                )
            )
        print(
            f"dashboard:  {url}\njoin with:  {state['join_command']}\nlogs:       {state_dir}/*.log\n"
            f"running {f'for {args.duration:.0f} s' if args.duration else 'until Ctrl-C'}",
            flush=True,
        )
        started = time.monotonic()
        while args.duration is None or time.monotonic() - started < args.duration:
            if any(process.poll() is not None for process in processes):
                print("demo: a process stopped early; see the logs", file=sys.stderr)
                return 1
            time.sleep(1)
        with urllib.request.urlopen(url + "api/v1/state", timeout=5) as response:
            state = json.loads(response.read())
        print(f"epoch {state['epoch']}, loss {state['loss']}, {state['samples_total']} samples contributed")
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        stop(processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
