"""How averaging rounds end: succeeded, partial and failed per 100 rounds, by swarm size.

    python benchmarks/rounds.py                          # 2, 4 and 8 peers, 25 epochs each, with and without the fixes
    python benchmarks/rounds.py --peers-list 2 --epochs 5 --modes fixed   # a quick check

For each swarm size, a fresh swarm of tiny-model peers (processes on loopback, started together)
trains with the shipped run configuration (matchmaking 5 s, averaging timeout 60 s, 8-bit codec,
CenteredClip, state averaged every 5 epochs, target batch 64). Every gradient round of every peer
is counted by how it ended for that peer (peer.averager.RoundOutcome): succeeded (every value
averaged with the group), partial (some parts stayed the peer's own: a reducer failed or timed
out) or failed (no group, an error, a timeout). Mode "fixed" runs Starling's peers as shipped;
"hivemind" puts back hivemind's own code where peer.hivemind_fixes corrects it. Also: seconds per
epoch (median over the peers' epochs), the median fraction averaged in partial rounds, and why each
round that did not succeed did not (the JSON's "problems"). Prints a table and writes
benchmarks/results/rounds-cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

from benchmarks.measure import write_json  # noqa: E402
from benchmarks.swarm_runs import RunSettings, SwarmOptions, run_swarm  # noqa: E402

OUTCOMES = ("succeeded", "partial", "failed")


def swarm_row(peers: int, mode: str, result: dict) -> dict:
    """Round outcomes per 100 rounds, summed over the swarm's peers, and epoch times."""
    summaries = result["peers"]
    counts = {outcome: sum(peer[f"rounds_{outcome}"] for peer in summaries) for outcome in OUTCOMES}
    total = sum(counts.values())
    fractions = [fraction for peer in summaries for fraction in peer["partial_round_fractions"]]
    epoch_seconds = [
        later["time"] - earlier["time"]
        for peer in summaries
        for earlier, later in zip(peer["epochs"], peer["epochs"][1:])
    ]
    return dict(
        peers=peers,
        mode=mode,
        rounds=total,
        **counts,
        per_100={outcome: 100 * counts[outcome] / total if total else 0.0 for outcome in OUTCOMES},
        median_partial_fraction=statistics.median(fractions) if fractions else None,
        median_epoch_s=statistics.median(epoch_seconds) if epoch_seconds else None,
        longest_epoch_s=max(epoch_seconds, default=None),
        resyncs=sum(peer["resyncs"] for peer in summaries),
        # Why each round that did not succeed did not (peer.events: round_problems).
        problems=[problem for peer in summaries for epoch in peer["epochs"] for problem in epoch["round_problems"]],
    )


def print_table(rows: list[dict]) -> None:
    print(
        "| peers | code | rounds | succeeded /100 | partial /100 | failed /100 | median fraction in partial "
        "| epoch s (median / longest) | resyncs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fraction = "-" if row["median_partial_fraction"] is None else f"{row['median_partial_fraction']:.3f}"
        per_100 = " | ".join(f"{row['per_100'][outcome]:.1f}" for outcome in OUTCOMES)
        print(
            f"| {row['peers']} | {row['mode']} | {row['rounds']} | {per_100} | {fraction} | "
            f"{row['median_epoch_s']:.1f} / {row['longest_epoch_s']:.1f} | {row['resyncs']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers-list", type=int, nargs="+", default=[2, 4, 8], help="swarm sizes, one swarm each")
    parser.add_argument("--epochs", type=int, default=25, help="epochs each swarm trains")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["fixed", "hivemind"],
        default=["hivemind", "fixed"],
        help="fixed: Starling's peers as shipped; hivemind: without peer.hivemind_fixes",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one swarm may take")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="starling-rounds-"))
    print(f"logs in {folder}", flush=True)
    settings = RunSettings(preset="tiny")  # every other setting as shipped
    rows = []
    for peers in args.peers_list:
        for mode in args.modes:
            name = f"{peers}-{mode}"
            run_toml = settings.write(folder / f"run-{name}.toml", run_id=f"rounds-{name}")
            options = replace(SwarmOptions(), peers=peers, timeout=args.timeout, hivemind_fixes=mode == "fixed")
            rows.append(swarm_row(peers, mode, run_swarm(folder / name, run_toml, options, max_epochs=args.epochs)))
            print(f"{peers} peers, {mode}: {rows[-1]['per_100']}", flush=True)

    path = write_json("rounds-cpu.json", dict(preset=settings.preset, epochs=args.epochs, rows=rows))
    print_table(rows)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
