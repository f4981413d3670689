"""What an organiser waits for: a fresh peer showing on the dashboard, and checkpoints of a run.

    python benchmarks/coordinator.py [--preset demo] [--checkpoints 3]

Starts a real coordinator (checkpoint every epoch) and one peer as processes on loopback, like
`make demo`. Measures the time from launching the peer to its first appearance in
/api/v1/state and to its first counted samples, and for each checkpoint the state download (as
the coordinator logs it), the write and the size on disk. Prints a table and writes
benchmarks/results/coordinator-<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

from benchmarks.measure import write_json  # noqa: E402
from coordinator.demo import launch, stop, wait_for_state  # noqa: E402

WRITTEN = re.compile(r"checkpoint of epoch (\d+) written to \S+ \(([\d.]+) MB in ([\d.]+) s\)")
DOWNLOADED = re.compile(r"downloaded [\d.]+ MB of state from \S+ in ([\d.]+) s")
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


def state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/v1/state", timeout=10) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--dashboard-port", type=int, default=8089)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="starling-benchmark-"))
    (folder / "run.toml").write_text(RUN_TOML.format(preset=args.preset))
    url = f"http://127.0.0.1:{args.dashboard_port}/"
    log = folder / "coordinator.log"
    processes = [
        launch(
            [
                "coordinator.cli",
                "--config",
                str(folder / "run.toml"),
                "--state-dir",
                str(folder),
                "--host-maddrs",
                "/ip4/127.0.0.1/tcp/0",
                "--dashboard-port",
                str(args.dashboard_port),
            ],
            log,
        )
    ]
    try:
        initial_peers = wait_for_state(url, processes[0], log)["initial_peers"]
        launched = time.monotonic()
        processes.append(
            launch(
                [
                    "peer.cli",
                    "--initial-peers",
                    *initial_peers,
                    "--name",
                    "benchmark",
                    "--host-maddrs",
                    "/ip4/127.0.0.1/tcp/0",
                    "--batch-size",
                    "4",
                ],
                folder / "peer.log",
            )
        )
        appeared = contributed = None
        while contributed is None or len(WRITTEN.findall(log.read_text())) < args.checkpoints:
            peers = state(url)["peers"]
            if peers and appeared is None:
                appeared = time.monotonic() - launched
            if peers and peers[0]["samples"] > 0 and contributed is None:
                contributed = time.monotonic() - launched
            if time.monotonic() - launched > 900:
                sys.exit(f"timed out; see {folder}")
            time.sleep(0.25)
    finally:
        stop(processes)

    text = log.read_text()
    written = [(int(e), float(mb), float(s)) for e, mb, s in WRITTEN.findall(text)]
    downloads = [float(s) for s in DOWNLOADED.findall(text)]
    result = dict(
        preset=args.preset,
        peer_appears_s=appeared,
        peer_contributes_s=contributed,
        checkpoint_mb=written[-1][1],
        checkpoint_download_s=statistics.median(downloads),
        checkpoint_write_s=statistics.median(s for _, _, s in written),
        checkpoints=len(written),
    )
    path = write_json(f"coordinator-{args.preset}.json", result)
    print(
        "| preset | peer on dashboard s | peer contributing s | checkpoint MB "
        "| download s (median) | write s (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {args.preset} | {appeared:.1f} | {contributed:.1f} | {written[-1][1]:.1f} | "
        f"{result['checkpoint_download_s']:.2f} | {result['checkpoint_write_s']:.2f} |"
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
