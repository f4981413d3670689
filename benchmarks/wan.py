"""Training over capped links: round time and swarm throughput with every peer's bandwidth capped.

    sudo python benchmarks/wan.py                          # 2 peers, tiny model, 1000 100 20 Mbit/s, 4 epochs each
    sudo python benchmarks/wan.py --peers 3 --caps 100 20 --epochs 6
    sudo python benchmarks/wan.py --preset demo --target-batch 128   # 21 M parameters: minutes per epoch at 20 Mbit/s
    sudo python benchmarks/wan.py --modes batch diloco --samples-per-round 1024   # DiLoCo beside batch mode
    sudo python benchmarks/wan.py --modes batch diloco --overlap off on   # DiLoCo with and without overlap

Needs root: each peer runs in a network namespace of its own (benchmarks/netlab.py) with its
upload and download capped by tc's token bucket filter, joined to the others through a bridge.
For each cap and training mode, a fresh swarm (benchmarks/swarm_runs.py) trains --epochs epochs
(in DiLoCo mode, --rounds outer rounds of --samples-per-round samples).

Columns: `link Mbit/s` is one TCP stream between two of the lab's hosts through the cap (what
the lab really lets through), `step s` the median time of the optimizer step that ends an epoch
(gradient all-reduce, update and state averaging; epoch 1 left out, its round also opens the
connections), `s per epoch` and `samples/s` the swarm's over the training time (start line to the
last peer's end), `MB/s per peer` the bytes each peer's link carried both ways over the training
time (libp2p framing, encryption and the DHT's traffic included), the mean over peers, and `kB per
sample` the swarm's bytes over the training time per sample trained (`with start-up`: from the
peers' launch to their exit, joining the DHT and the swarm included). Latency and loss are not
emulated: that needs netem. On one machine the peers share its cores: compute is slower than on
separate machines, and only the links are separate.
Prints a table and writes benchmarks/results/wan-<device>.json (wan-<device>-modes.json when
--modes names more than batch mode, wan-<device>-modes-overlap.json with --overlap on).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

import torch  # noqa: E402

from benchmarks.link import stream_bytes_per_second  # noqa: E402
from benchmarks.measure import write_json  # noqa: E402
from benchmarks.netlab import Lab, TrafficLog, why_no_lab  # noqa: E402
from benchmarks.swarm import swarm_row  # noqa: E402
from benchmarks.swarm_runs import (  # noqa: E402
    RunSettings,
    add_overlap_argument,
    add_swarm_arguments,
    run_settings,
    run_swarm,
    swarm_arguments,
    swarm_options,
)
from peer.run_config import MODES, PSEUDO_GRADIENT_COMPRESSIONS  # noqa: E402


def step_seconds(result: dict) -> float:
    """Median over peers and epochs (from epoch 2) of the time of the step that ended an epoch."""
    steps = [record["step_seconds"] for peer in result["peers"] for record in peer["epochs"] if record["epoch"] >= 2]
    return statistics.median(steps) if steps else float("nan")


def measure_cap(
    lab: Lab, mbit: float, folder: Path, run_toml: Path, args: argparse.Namespace, settings: RunSettings, epochs: int
) -> dict:
    """Cap every host at `mbit` and train one swarm; the row of the table."""
    hosts = lab.hosts[: args.peers]
    for host in hosts:
        lab.cap(host, mbit)
    link = stream_bytes_per_second(hosts[1].address, sender=hosts[0].command, receiver=hosts[1].command)
    with TrafficLog(lab, hosts) as traffic:
        result = run_swarm(folder, run_toml, swarm_options(args), max_epochs=epochs, lab=lab)
    row = swarm_row(settings.samples_per_epoch, result)
    moved = traffic.between(min(peer["started"] for peer in row["peers"]), max(peer["ended"] for peer in row["peers"]))
    everything = traffic.total()
    return dict(
        mode=settings.mode + (" overlap" if settings.mode == "diloco" and settings.overlap else ""),
        compression=settings.diloco_compression if settings.mode == "diloco" else settings.compression,
        cap_mbit=mbit,
        link_mbit=link * 8 / 1e6,
        step_s=step_seconds(result),
        bytes_per_s_per_peer=statistics.fmean(moved) / row["training_s"],
        bytes_per_peer=moved,
        bytes_per_sample=sum(moved) / row["samples"],
        bytes_per_peer_with_startup=everything,
        bytes_per_sample_with_startup=sum(everything) / row["samples"],
        **row,
    )


def print_table(rows: list[dict]) -> None:
    print(
        "| mode | cap Mbit/s | link Mbit/s | epochs | step s | s per epoch | samples/s | MB/s per peer "
        "| kB per sample | with start-up | rounds ok/failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        rounds = " ".join(f"{peer['rounds_succeeded']}/{peer['rounds_failed']}" for peer in row["peers"])
        print(
            f"| {row['mode']} | {row['cap_mbit']:g} | {row['link_mbit']:.1f} | {row['epochs']} | {row['step_s']:.2f} | "
            f"{row['seconds_per_epoch']:.1f} | {row['samples_per_s']:.2f} | "
            f"{row['bytes_per_s_per_peer'] / 1e6:.2f} | {row['bytes_per_sample'] / 1e3:.2f} | "
            f"{row['bytes_per_sample_with_startup'] / 1e3:.2f} | {rounds} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_swarm_arguments(parser, peers=2)
    parser.set_defaults(preset="tiny", seq_len=32, matchmaking_time=2.0)
    parser.add_argument("--caps", type=float, nargs="+", default=[1000, 100, 20], help="Mbit/s per peer, each way")
    parser.add_argument("--target-batch", type=int, default=64, help="samples per epoch for the whole swarm")
    parser.add_argument("--epochs", type=int, default=4, help="epochs each batch-mode swarm trains")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["batch"], help="training modes to measure")
    parser.add_argument("--samples-per-round", type=int, default=1024, help="DiLoCo: samples per outer round")
    parser.add_argument("--inner-batch", type=int, default=16, help="DiLoCo: samples per inner step")
    parser.add_argument(
        "--diloco-compression",
        choices=PSEUDO_GRADIENT_COMPRESSIONS,
        default="adaptive-8bit",
        help="DiLoCo: the pseudo-gradients' codec",
    )
    parser.add_argument("--rounds", type=int, default=3, help="outer rounds each DiLoCo swarm trains")
    add_overlap_argument(parser)
    args = parser.parse_args()
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    if (reason := why_no_lab()) is not None:
        sys.exit(reason)

    folder = Path(tempfile.mkdtemp(prefix="starling-wan-"))
    print(f"logs in {folder}", flush=True)
    rows = []
    with Lab(hosts=args.peers) as lab:
        for mbit in args.caps:
            variants = [(mode, overlap == "on") for mode in args.modes for overlap in args.overlap]
            for mode, overlap in dict.fromkeys((m, o and m == "diloco") for m, o in variants):
                settings = run_settings(
                    args,
                    target_batch_size=args.target_batch,
                    mode=mode,
                    samples_per_round=args.samples_per_round,
                    inner_batch_size=args.inner_batch,
                    diloco_compression=args.diloco_compression,
                    overlap=overlap,
                )
                name = f"{mode}{'-overlap' if overlap else ''}-{mbit:g}"
                run_toml = settings.write(folder / f"run-{name}.toml", run_id=f"wan-{name}")
                epochs = args.rounds if mode == "diloco" else args.epochs
                rows.append(measure_cap(lab, mbit, folder / f"cap-{name}", run_toml, args, settings, epochs))
                print(
                    f"{rows[-1]['mode']}, {mbit:g} Mbit/s: {rows[-1]['samples_per_s']:.2f} samples/s, "
                    f"{rows[-1]['bytes_per_sample'] / 1e3:.1f} kB per sample",
                    flush=True,
                )

    suffix = ("" if args.modes == ["batch"] else "-modes") + ("-overlap" if "on" in args.overlap else "")
    path = write_json(
        f"wan-{torch.device(args.device).type}{suffix}.json",
        dict(
            command=" ".join(["python", *sys.argv]),
            **swarm_arguments(args),
            target_batch_size=args.target_batch,
            epochs=args.epochs,
            samples_per_round=args.samples_per_round,
            inner_batch=args.inner_batch,
            diloco_compression=args.diloco_compression,
            rounds=args.rounds,
            overlap=args.overlap,
            rows=rows,
        ),
    )
    print_table(rows)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
