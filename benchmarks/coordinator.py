"""What an organiser waits for: a fresh peer showing on the dashboard, and checkpoints of a run.

    python benchmarks/coordinator.py [--preset demo] [--checkpoints 3]

Starts a real coordinator (checkpoint every epoch) and one `starling-peer` as processes on loopback,
like `make demo` (coordinator.harness). Measures the time from launching the peer to its first
appearance in /api/v1/state and to its first counted samples, and for each checkpoint the state
download, the write and the size on disk (from the coordinator's "checkpoint" events). Prints a
table and writes benchmarks/results/coordinator-<preset>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

from benchmarks.measure import write_json  # noqa: E402
from coordinator.harness import LOOPBACK_VOLUNTEER, CoordinatorProcess, PeerProcess, stop_all, wait_until  # noqa: E402

RUN_TOML = """\
run_id = "benchmark"
[model]
preset = "{preset}"
[training]
target_batch_size = 16
[averaging]
matchmaking_time = 2.0
[coordinator]
checkpoint_every = 1
keep_checkpoints = 2
"""
TIMEOUT = 900.0  # seconds the whole measurement may take


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--checkpoints", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="starling-benchmark-"))
    (folder / "run.toml").write_text(RUN_TOML.format(preset=args.preset))
    coordinator = CoordinatorProcess(folder, folder / "run.toml")
    processes = [coordinator]
    appeared = contributed = None

    def measure() -> bool:
        nonlocal appeared, contributed
        peers = coordinator.state()["peers"]
        if peers and appeared is None:
            appeared = time.monotonic() - launched
        if peers and peers[0]["samples"] > 0 and contributed is None:
            contributed = time.monotonic() - launched
        written = [e for e in coordinator.events() if e["event"] == "checkpoint"]
        return contributed is not None and len(written) >= args.checkpoints

    try:
        coordinator.start()
        launched = time.monotonic()
        arguments = ["--initial-peers", coordinator.address, "--name", "benchmark", *LOOPBACK_VOLUNTEER]
        processes.append(PeerProcess.command_line(folder / "peer", arguments))
        wait_until(measure, TIMEOUT, f"{args.checkpoints} checkpoints (see {folder})", alive=processes, period=0.25)
    finally:
        stop_all(processes)

    written = [e for e in coordinator.events() if e["event"] == "checkpoint"]
    result = dict(
        preset=args.preset,
        peer_appears_s=appeared,
        peer_contributes_s=contributed,
        checkpoint_mb=written[-1]["size_bytes"] / 1e6,
        checkpoint_download_s=statistics.median(e["download_seconds"] for e in written),
        checkpoint_write_s=statistics.median(e["write_seconds"] for e in written),
        checkpoints=len(written),
    )
    path = write_json(f"coordinator-{args.preset}.json", result)
    print(
        "| preset | peer on dashboard s | peer contributing s | checkpoint MB "
        "| download s (median) | write s (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {args.preset} | {appeared:.1f} | {contributed:.1f} | {result['checkpoint_mb']:.1f} | "
        f"{result['checkpoint_download_s']:.2f} | {result['checkpoint_write_s']:.2f} |"
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
