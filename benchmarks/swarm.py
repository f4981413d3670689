"""Swarm efficiency: how much of its time each peer computes, and how much of that the swarm turns into samples.

    python benchmarks/swarm.py                        # 2 peers, demo model, target batch 32 64 128 256, 5 epochs each
    python benchmarks/swarm.py --peers 4 --target-batches 64 256 --epochs 10
    python benchmarks/swarm.py --preset tiny --target-batches 16 32 --epochs 3 --matchmaking-time 2   # a quick check

For each target batch size, a fresh swarm of N peers (processes on loopback, one torch thread
each by default) builds its model, joins, waits at a start line until every peer is ready, and
trains for --epochs epochs. Start-up (imports, model build, DHT join) is outside the measured
time; it is reported on its own.

Per peer: `compute s` is its time in forward and backward (PeerSummary.compute_seconds), `training s`
its time from the start line to leaving the training loop, `outside compute` the rest as a
fraction of training s (matchmaking, all-reduce, optimizer step, waiting for the others), and
`own samples/s` its samples over its compute s: what it would make with no time outside compute.
Per swarm: `samples/s` is all samples contributed over the training time (start line to the last
peer's end), and `efficiency` is that over the sum of the peers' own samples/s: the compute
utilisation DeDLOC and OpenDiLoCo report (90-95% there). `efficiency from epoch 1` is the same
figure over the time after each peer's first optimizer step (the first round also opens the
connections between peers).

On one machine the N peers share its cores (and averaging takes CPU too): the figures measure
the time lost to communication and waiting, not how training scales with peers. A peer's own
rate is its average under that sharing. Prints tables and writes benchmarks/results/swarm-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

import torch  # noqa: E402

from benchmarks.measure import write_json  # noqa: E402
from benchmarks.swarm_runs import add_swarm_arguments, run_settings, run_swarm, swarm_arguments, swarm_options  # noqa: E402
from peer.run_config import COMPRESSIONS  # noqa: E402


def peer_window(peer: dict, from_epoch: int) -> dict:
    """A peer's samples, compute time and training time from the start line (from_epoch 0), or
    from when it reached from_epoch (or later, if it jumped there by loading state), to its end."""
    start = dict(time=peer["training_started"], samples_contributed=0, compute_seconds=0.0)
    if from_epoch:
        start = next(record for record in peer["epochs"] if record["epoch"] >= from_epoch)
    samples = peer["samples_contributed"] - start["samples_contributed"]
    compute = peer["compute_seconds"] - start["compute_seconds"]
    training = peer["training_ended"] - start["time"]
    return dict(
        started=start["time"],
        ended=peer["training_ended"],
        samples=samples,
        compute_s=compute,
        training_s=training,
        outside_compute=1 - compute / training,
        own_samples_per_s=samples / compute if compute > 0 else 0.0,
    )


def swarm_figures(windows: list[dict], epochs: int) -> dict:
    """The swarm's throughput over the peers' windows against the sum of their own rates."""
    training = max(w["ended"] for w in windows) - min(w["started"] for w in windows)
    samples = sum(w["samples"] for w in windows)
    own = sum(w["own_samples_per_s"] for w in windows)
    return dict(
        training_s=training,
        seconds_per_epoch=training / epochs,
        samples=samples,
        samples_per_s=samples / training,
        own_samples_per_s_sum=own,
        efficiency=samples / training / own if own > 0 else 0.0,
        outside_compute_mean=statistics.fmean(w["outside_compute"] for w in windows),
    )


def swarm_row(target_batch_size: int, result: dict) -> dict:
    """Figures from the start line, and from epoch 1 on (without the first round's set-up)."""
    summaries = result["peers"]
    epochs = min(peer["epoch"] for peer in summaries)
    windows = [peer_window(peer, 0) for peer in summaries]
    figures = swarm_figures(windows, epochs)
    return dict(
        target_batch_size=target_batch_size,
        epochs=epochs,
        startup_s=result["released"] - result["launched"],
        samples_per_s_with_startup=figures["samples"] / (max(w["ended"] for w in windows) - result["launched"]),
        **figures,
        from_epoch_1=swarm_figures([peer_window(peer, 1) for peer in summaries], epochs - 1) if epochs > 1 else None,
        peers=[
            dict(
                name=f"peer-{index}",
                epoch=peer["epoch"],
                rounds_succeeded=peer["rounds_succeeded"],
                rounds_failed=peer["rounds_failed"],
                **window,
            )
            for index, (peer, window) in enumerate(zip(summaries, windows))
        ],
    )


def print_tables(rows: list[dict]) -> None:
    print(
        "| target batch | peer | samples | compute s | training s | outside compute | own samples/s | "
        "rounds ok/failed |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for peer in row["peers"]:
            print(
                f"| {row['target_batch_size']} | {peer['name']} | {peer['samples']} | {peer['compute_s']:.1f} | "
                f"{peer['training_s']:.1f} | {peer['outside_compute']:.1%} | {peer['own_samples_per_s']:.2f} | "
                f"{peer['rounds_succeeded']}/{peer['rounds_failed']} |"
            )
    print()
    print(
        "| target batch | epochs | s per epoch | swarm samples/s | sum of own samples/s | efficiency | "
        "outside compute (mean) | efficiency from epoch 1 | start-up s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        later = "-" if row["from_epoch_1"] is None else f"{row['from_epoch_1']['efficiency']:.1%}"
        print(
            f"| {row['target_batch_size']} | {row['epochs']} | {row['seconds_per_epoch']:.1f} | "
            f"{row['samples_per_s']:.2f} | {row['own_samples_per_s_sum']:.2f} | {row['efficiency']:.1%} | "
            f"{row['outside_compute_mean']:.1%} | {later} | {row['startup_s']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_swarm_arguments(parser, peers=2)
    parser.add_argument(
        "--target-batches",
        type=int,
        nargs="+",
        default=[32, 64, 128, 256],
        help="target batch sizes (samples per epoch for the whole swarm), one swarm each",
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs each swarm trains")
    parser.add_argument("--compression", default="adaptive-8bit", choices=COMPRESSIONS, help="gradient codec")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="starling-swarm-"))
    print(f"logs in {folder}", flush=True)
    rows = []
    for target in args.target_batches:
        settings = run_settings(args, target_batch_size=target, compression=args.compression)
        run_toml = settings.write(folder / f"run-{target}.toml", run_id=f"swarm-{target}")
        result = run_swarm(folder / f"target-{target}", run_toml, swarm_options(args), max_epochs=args.epochs)
        rows.append(swarm_row(target, result))
        print(f"target batch {target}: efficiency {rows[-1]['efficiency']:.1%}", flush=True)

    path = write_json(
        f"swarm-{torch.device(args.device).type}.json",
        dict(
            **swarm_arguments(args),
            compression=args.compression,
            epochs=args.epochs,
            rows=rows,
        ),
    )
    print_tables(rows)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
