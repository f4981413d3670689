"""A written model of compute utilisation in batch and DiLoCo mode, from costs measured here.

Utilisation is the fraction of a peer's wall time spent computing (forward and backward). Per
epoch (batch mode) or outer round (DiLoCo), a peer computes its share of the samples, does what
else a step needs (optimizer, data, bookkeeping), then averages:

    compute  = samples per peer x seconds per sample
    busy     = compute x (1 + overhead)
    exposed  = bytes sent / (link - upkeep) + values x seconds per value + round latency
    with overlap (DiLoCo): exposed = max(0, exposed - busy), the next round computing meanwhile
    utilisation = compute / (busy + exposed)

Bytes: hivemind's butterfly all-reduce sends 2 (n - 1) / n of the averaged tensor from each peer
(reduce-scatter, then all-gather) at the codec's bits per value; batch mode also averages the
parameters and AdamW's two moments in float32 every `average_state_every` epochs (shipped: 5).
Measured on this machine and used as inputs:
- upkeep: each peer's steady traffic (DHT records, libp2p), taken as the least a DiLoCo peer's
  link carried per second of training (results/wan-cpu-modes-overlap.json; its rare rounds
  included, so an upper bound);
- round latency: the round-ending step at 1000 Mbit/s, per mode (same file): matchmaking already
  done, the group's handshakes, the optimizer or outer step;
- overhead: what a DiLoCo peer spends outside forward and backward at 1000 Mbit/s with overlap,
  where nothing waits on the network (same file), per second of compute;
- seconds per value: a 2-peer loopback all-reduce of 50 M values with the 8-bit codec over its
  values (results/allreduce-cpu.json): the codec and the copies, on CPU.
The first table checks the model against the runs these come from; the second predicts larger
runs on volunteer GPUs with this machine's upkeep, round latency and codec speed (pessimistic for
a GPU peer, whose codec runs on the GPU) and `--overhead` (default 0: it then reads as the share of
time not spent waiting on the network; this 2-core machine's 18% is no guide to a GPU peer's).

    python benchmarks/utilisation.py
writes results/utilisation.json and prints both tables (markdown).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from measure import RESULTS, write_json

MEASURED_WAN = RESULTS / "wan-cpu-modes-overlap.json"
MEASURED_ALLREDUCE = RESULTS / "allreduce-cpu.json"
TINY_PARAMETERS = 2.1e6  # the tiny preset, which the WAN measurements ran
MODELS = {"bloom-560m": 0.56e9, "mistral-7b": 7.24e9}
STATE_BYTES_PER_PARAMETER = 12  # float32 parameters and AdamW's two moments
LINKS_MBIT = (20, 100, 1000)
PEERS = (8, 16, 32, 64)


@dataclass(frozen=True)
class Costs:
    """What training costs beside compute and transfer, as measured here."""

    upkeep_bytes_per_s: float
    round_latency_s: dict[str, float]  # per mode
    overhead: float  # seconds outside forward and backward per second inside
    seconds_per_value: float  # of an all-reduce, beside the transfer


@dataclass(frozen=True)
class Run:
    mode: str  # "batch" or "diloco"
    parameters: float
    peers: int
    link_mbit: float
    seconds_per_sample: float  # one peer's compute per training sample
    samples_per_peer: float  # per epoch (batch) or round (DiLoCo)
    bits: float  # per value of the averaged tensor
    overlap: bool = False
    state_every: int | None = None  # batch mode: epochs between state averaging rounds


def all_reduce_bytes(values: float, peers: int, bits: float) -> float:
    """Bytes each peer sends in one butterfly all-reduce of `values` values."""
    return 2 * (peers - 1) / peers * values * bits / 8


def utilisation(run: Run, costs: Costs, overhead: float | None = None) -> float:
    """`overhead`: in place of the measured one."""
    sent = all_reduce_bytes(run.parameters, run.peers, run.bits)
    values = run.parameters
    if run.state_every:
        sent += all_reduce_bytes(run.parameters, run.peers, 8 * STATE_BYTES_PER_PARAMETER) / run.state_every
        values += run.parameters / run.state_every
    bandwidth = run.link_mbit * 1e6 / 8 - costs.upkeep_bytes_per_s
    compute = run.samples_per_peer * run.seconds_per_sample
    busy = compute * (1 + (costs.overhead if overhead is None else overhead))
    exposed = sent / bandwidth + values * costs.seconds_per_value + costs.round_latency_s[run.mode]
    if run.overlap:
        exposed = max(0.0, exposed - busy)
    return compute / (busy + exposed)


def measured_costs(wan: dict, allreduce: dict) -> Costs:
    rows = wan["rows"]
    fastest = max(row["cap_mbit"] for row in rows)
    latency = {
        mode: min(row["step_s"] for row in rows if row["mode"] == mode and row["cap_mbit"] == fastest)
        for mode in ("batch", "diloco")
    }
    idle = min(
        row["outside_compute_mean"] for row in rows if row["mode"] == "diloco overlap" and row["cap_mbit"] == fastest
    )
    codec = next(
        row for row in allreduce["rows"] if row["method"] == "starling8" and row["peers"] == 2 and row["numel"] >= 5e7
    )
    return Costs(
        upkeep_bytes_per_s=min(row["bytes_per_s_per_peer"] for row in rows if row["mode"].startswith("diloco")),
        round_latency_s=latency,
        overhead=idle / (1 - idle),
        seconds_per_value=codec["round_s"] / codec["numel"],
    )


def check_against_measurements(wan: dict, costs: Costs) -> list[dict]:
    """The model's utilisation for each measured run beside the run's own (its peers' share of
    wall time spent computing)."""
    checks = []
    for row in wan["rows"]:
        peers = len(row["peers"])
        mode, _, overlap = row["mode"].partition(" ")  # "batch", "diloco" or "diloco overlap"
        diloco = mode == "diloco"
        state_every = wan["average_state_every"]
        run = Run(
            mode=mode,
            parameters=TINY_PARAMETERS,
            peers=peers,
            link_mbit=row["link_mbit"],
            seconds_per_sample=peers / row["own_samples_per_s_sum"],
            samples_per_peer=row["target_batch_size"] / peers,
            bits=4 if diloco else 8,
            overlap=bool(overlap),
            # a run shorter than average_state_every epochs averaged no state
            state_every=None if diloco or row["epochs"] < state_every else state_every,
        )
        checks.append(
            dict(
                mode=row["mode"],
                cap_mbit=row["cap_mbit"],
                measured=1 - row["outside_compute_mean"],
                predicted=utilisation(run, costs),
            )
        )
    return checks


def predictions(
    costs: Costs, effective_tflops: float, seq_len: int, batch_samples: int, inner: int, overhead: float
) -> list[dict]:
    rows = []
    for model, parameters in MODELS.items():
        seconds_per_sample = 6 * parameters * seq_len / (effective_tflops * 1e12)
        for peers in PEERS:
            for link in LINKS_MBIT:
                shared = dict(parameters=parameters, peers=peers, link_mbit=link, seconds_per_sample=seconds_per_sample)
                modes = {
                    "batch (8-bit)": Run(
                        "batch", **shared, samples_per_peer=batch_samples / peers, bits=8, state_every=5
                    ),
                    "diloco (4-bit)": Run("diloco", **shared, samples_per_peer=inner, bits=4),
                    "diloco (4-bit, overlap)": Run("diloco", **shared, samples_per_peer=inner, bits=4, overlap=True),
                }
                rows.append(
                    dict(
                        model=model,
                        peers=peers,
                        link_mbit=link,
                        **{mode: utilisation(run, costs, overhead) for mode, run in modes.items()},
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--effective-tflops", type=float, default=25.0, help="a volunteer GPU's sustained FLOP/s")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-samples", type=int, default=512, help="batch mode: the swarm's target batch")
    parser.add_argument("--inner-samples", type=int, default=4000, help="DiLoCo: each peer's samples per round")
    parser.add_argument("--overhead", type=float, default=0.0, help="a GPU peer's time outside forward and backward")
    args = parser.parse_args()
    wan = json.loads(MEASURED_WAN.read_text())
    costs = measured_costs(wan, json.loads(MEASURED_ALLREDUCE.read_text()))
    checks = check_against_measurements(wan, costs)
    rows = predictions(
        costs, args.effective_tflops, args.seq_len, args.batch_samples, args.inner_samples, args.overhead
    )
    write_json(
        "utilisation.json",
        dict(command="python benchmarks/utilisation.py", **vars(args), costs=vars(costs), checks=checks, rows=rows),
    )
    print("| mode | cap Mbit/s | measured | predicted |\n|---|---:|---:|---:|")
    for check in checks:
        print(f"| {check['mode']} | {check['cap_mbit']:.0f} | {check['measured']:.2f} | {check['predicted']:.2f} |")
    modes = [key for key in rows[0] if key not in ("model", "peers", "link_mbit")]
    print("\n| model | peers | link Mbit/s | " + " | ".join(modes) + " |")
    print("|---|---:|---:|" + "---:|" * len(modes))
    for row in rows:
        print(
            f"| {row['model']} | {row['peers']} | {row['link_mbit']} | "
            + " | ".join(f"{row[mode]:.2f}" for mode in modes)
            + " |"
        )


if __name__ == "__main__":
    main()
