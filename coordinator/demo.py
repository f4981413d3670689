"""A whole run on this machine: a coordinator and two peers training the demo model on the bundled plays.

The plays go the way of any run's data: prepared at first use (starling-data prepare's steps, kept
in the cache), served by the coordinator, and downloaded by the peers shard by shard, each checked
against the manifest that the signed run record names.

    python -m coordinator.demo [--duration SECONDS] [--peers N] [--dashboard-port PORT]

Prints the dashboard URL and the join command, runs until Ctrl-C (or --duration), then stops every
process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from importlib import resources
from pathlib import Path

from coordinator.harness import LOOPBACK_VOLUNTEER, CoordinatorProcess, HarnessError, PeerProcess, stop_all
from coordinator.prepare import prepare_cached
from model.data import bundled_corpus_files
from model.prepared import PrepareSettings, load_manifest, manifest_digest, write_atomic
from peer.run_config import RunConfig

STARTUP_TIMEOUT = 120.0


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
    config = demo_run_config(state_dir)
    coordinator = CoordinatorProcess(state_dir, config, dashboard_port=args.dashboard_port, state_dir=state_dir)
    processes: list = [coordinator]
    try:
        coordinator.start(timeout=STARTUP_TIMEOUT)
        state = coordinator.state()
        for index in range(args.peers):
            name = f"demo-peer-{index + 1}"
            arguments = ["--initial-peers", *state["initial_peers"], "--name", name, *LOOPBACK_VOLUNTEER]
            processes.append(PeerProcess.command_line(state_dir / name, arguments))
        print(
            f"dashboard:  {coordinator.url}/\njoin with:  {state['join_command']}\n"
            f"logs:       {state_dir}/coordinator-1.log, {state_dir}/demo-peer-*/log.txt\n"
            f"running {f'for {args.duration:.0f} s' if args.duration else 'until Ctrl-C'}",
            flush=True,
        )
        started = time.monotonic()
        while args.duration is None or time.monotonic() - started < args.duration:
            for process in processes:
                process.check_running()
            time.sleep(1)
        state = coordinator.state()
        loss = "n/a" if state["loss"] is None else f"{state['loss']:.3f}"
        print(f"epoch {state['epoch']}, loss {loss}, {state['samples_total']} samples contributed", flush=True)
    except HarnessError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        stop_all(processes)
    return 0


def demo_run_config(state_dir: Path) -> Path:
    """The example run on the bundled plays, prepared for its sequence length: written to
    `state_dir`/run.toml, with the [data] lines that name the prepared folder and its digest."""
    example_path = resources.files("coordinator") / "run.example.toml"
    example = example_path.read_text()
    seq_len = RunConfig.load(str(example_path)).data.seq_len
    plays = prepare_cached(bundled_corpus_files(), PrepareSettings(seq_len=seq_len))
    manifest = load_manifest(plays)
    print(
        f"data:       the bundled plays, prepared: {manifest.documents} documents, {manifest.tokens} tokens "
        f"in {len(manifest.shards)} shards ({plays})",
        flush=True,
    )
    data_lines = f'[data]\npath = {json.dumps(str(plays))}\ndataset = "{manifest_digest(plays)}"\n'
    config = state_dir / "run.toml"
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(config, re.sub(r"^\[data\]\n", data_lines, example, count=1, flags=re.MULTILINE).encode())
    return config


if __name__ == "__main__":
    sys.exit(main())
