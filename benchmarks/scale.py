"""Scale: swarms of 2 to 64 real peers on this machine, with the coordinator watching them.

    python benchmarks/scale.py                                # 2, 4, 8, 16, 32 and 64 peers
    python benchmarks/scale.py --peers-list 4 --epochs 4      # a quick check
    python benchmarks/scale.py --peers-list 16 --group-key-bits 0 1   # one matchmaking key, then two
    python benchmarks/scale.py --peers-list 32 64 --device-seconds 1  # peers that compute on a device
    python benchmarks/scale.py --plot                         # redraw the plot from the saved runs

For each swarm size, a coordinator (`starling-coordinator`) and a fleet of tiny-model harness peers
forked from one warmed-up process (coordinator.harness.PeerFleet: they share torch, hivemind and
Starling copy-on-write), joined through the coordinator, released together, trained with the shipped
run configuration (target batch: two micro-batches per peer, so that every peer contributes to every
epoch). Once the swarm is half-way, one more peer (the newcomer) starts. With --device-seconds S,
every micro-batch's forward pass first waits S seconds (peer.faults.FaultPlan.slow_forward) and its
sequences are 16 tokens rather than 128: a peer whose device does the math while its CPU stays free
for hivemind, as a volunteer's GPU does, so that the machine's cores go to what happens between the
peers rather than to their training. Measured,
from the peers' event streams and summaries and the coordinator's API:

- time to form a group: from a round's start of matchmaking to its all-reduce (peer.averager.RoundTiming;
  hivemind pre-schedules a round before the epoch ends, so this includes the wait for the trigger),
  and the all-reduce itself (medians over every peer's rounds), and the group sizes;
- the fraction of rounds that averaged every part (succeeded), partial, failed, and of those with
  a group, the fraction whose group held the whole swarm;
- DHT requests per second per peer (requests its DHT node sent over its life);
- memory per peer: the proportional set size (PSS) of the fleet's processes (the warmed-up parent,
  every peer with hivemind's processes and its libp2p daemon, the newcomer waiting to start), over
  the peers; measured once the swarm has trained a few epochs; and the CPU cores the fleet used
  from then until the swarm's last epoch but one, over the peers (all peers share this machine's
  cores: where they ask for more than it has, everything slows down);
- the coordinator's poll time (its read of the swarm's DHT records), and the most peers its API
  listed online at once;
- the newcomer's time from start to its first contributed round (an epoch event with a succeeded
  round), and to its first state load.

Prints a table and writes benchmarks/results/scale-cpu-<sizes>.json (scale-cpu-2-4-8-16.json for
--peers-list 2 4 8 16; scale-cpu-<sizes>-keys.json with --group-key-bits other than 0), then plots
every saved run's figures against the swarm size into benchmarks/results/scale.png (needs
matplotlib: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise, product
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

from benchmarks.measure import RESULTS, write_json  # noqa: E402
from benchmarks.swarm_runs import RunSettings, add_group_key_bits_argument  # noqa: E402
from coordinator.harness import (  # noqa: E402
    LOOPBACK_MADDR,
    CoordinatorProcess,
    HarnessError,
    PeerFleet,
    PeerSpec,
    release,
    stop_all,
)
from peer.faults import FaultPlan  # noqa: E402

BATCH_SIZE = 4  # each peer's micro-batch
# The tiny preset, narrower: 0.5 M parameters, 2 MB of gradient. Every process of a peer holds a few
# copies of its parameters or gradient (averagers' buffers, codec scratch), so this is what makes 64
# peers fit on one machine; matchmaking, the DHT and the coordinator do not depend on it.
MODEL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
# With --device-seconds, sequences this long: the forward and backward passes the CPU still does are
# an eighth of the shipped 128-token ones, and the wait stands for the device's time.
DEVICE_SEQ_LEN = 16
# Bytes a fleet peer takes at most, about: the tables' PSS per peer (measured after 3 epochs) is 426 MiB at
# 2 peers and 264-311 at 16 to 64, as more peers share the parent's pages, but 64 peers and the newcomer
# took 20.5 GiB with the coordinator near their end (323 MiB each); the larger swarms need the check.
PEER_MEMORY = 340 * 2**20
MEMORY_AT_EPOCH = 3  # the epoch after which the fleet's memory is measured
START_TIMEOUT = 900.0  # seconds for the swarm to join


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pss_bytes(pids: list[int]) -> int:
    """The proportional set size of these processes together (each shared page split among its users)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue  # it ended meanwhile
    return total


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user and system) these processes and their ended children have used so far (a
    child's time moves to its parent's account when it is reaped: peers that ended keep counting)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        ticks += sum(map(int, fields[11:15]))  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def cores_since(start: tuple[float, float], root: int) -> float:
    """The cores `root`'s processes used on average since `start` (time.monotonic(), their cpu_seconds then)."""
    return (cpu_seconds(process_tree(root)) - start[1]) / (time.monotonic() - start[0])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def available_memory() -> int:
    """Bytes of memory the kernel says are available for new work (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_scale(
    folder: Path,
    peers: int,
    epochs: int,
    target_group_size: int | None = None,
    group_key_bits: int = 0,
    newcomer: bool = True,
    timeout: float = 3600.0,
    device_seconds: float = 0.0,
) -> dict:
    """Train a swarm of `peers` fleet peers with a coordinator for `epochs` epochs (and a newcomer
    half-way), each micro-batch waiting `device_seconds` first; what it measured (see the module's
    docstring), with each peer's summary."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = RunSettings(
        preset="tiny",
        model_overrides=MODEL,
        target_batch_size=2 * peers * BATCH_SIZE,
        seq_len=DEVICE_SEQ_LEN if device_seconds else RunSettings.seq_len,
        target_group_size=target_group_size,
        group_key_bits=group_key_bits,
    )
    run_toml = settings.write(folder / "run.toml", run_id=f"scale-{peers}")
    coordinator = CoordinatorProcess(folder / "coordinator", run_toml).start()
    processes: list = [coordinator]
    polls, listed, memory, cpu, newcomer_started = [], 0, None, None, None
    try:
        base = dict(initial_peers=[coordinator.address], config=str(run_toml), batch_size=BATCH_SIZE)
        base.update(host_maddrs=[LOOPBACK_MADDR])
        hold, device = str(folder / "go"), FaultPlan(slow_forward=device_seconds) if device_seconds else None
        specs = [
            (f"peer-{i}", PeerSpec(dict(base, name=f"peer-{i}"), max_epochs=epochs, faults=device, hold_until=hold))
            for i in range(peers)
        ]
        if newcomer:
            go = str(folder / "newcomer-go")
            newcomer_spec = PeerSpec(dict(base, name="newcomer"), max_epochs=epochs, faults=device, start_after=go)
            specs.append(("newcomer", newcomer_spec))
        launched = time.time()
        fleet = PeerFleet(folder, specs)
        processes.insert(0, fleet)
        swarm, joiner = fleet.peers[:peers], fleet.peers[peers] if newcomer else None
        released = release(swarm, folder / "go", timeout=START_TIMEOUT)
        deadline = time.monotonic() + timeout
        while any(peer.exit_status() is None for peer in swarm):
            for peer in fleet.peers:
                if peer.exit_status() not in (None, 0):
                    peer.check_running("while the swarm trained")
            state = coordinator.state()
            if state["poll_seconds"] is not None:
                polls.append(state["poll_seconds"])
            listed = max(listed, sum(row["status"] == "online" for row in state["peers"]))
            reached = min(peer.logged_epoch() for peer in swarm)
            if memory is None and reached >= MEMORY_AT_EPOCH:
                memory = pss_bytes(process_tree(fleet.pid))
                cpu_from = (time.monotonic(), cpu_seconds(process_tree(fleet.pid)))
            if cpu is None and reached >= epochs - 1 and memory is not None:
                cpu = cores_since(cpu_from, fleet.pid)
            if joiner is not None and newcomer_started is None and reached >= epochs // 2:
                newcomer_started = time.time()
                Path(go).touch()
            if time.monotonic() > deadline:
                raise HarnessError(f"the swarm of {peers} did not finish within {timeout:.0f} s")
            time.sleep(1.0)
        if cpu is None and memory is not None:  # the swarm's last epochs passed between two looks
            cpu = cores_since(cpu_from, fleet.pid)
        summaries = [peer.wait(timeout=60) for peer in swarm]
        if joiner is not None:
            joiner.wait(timeout=max(60.0, deadline - time.monotonic()))
    finally:
        stop_all(processes)
    return dict(
        peers=peers,
        target_group_size=target_group_size,
        group_key_bits=group_key_bits,
        device_seconds=device_seconds,
        launched=launched,
        released=released,
        summaries=summaries,
        newcomer=newcomer_figures(joiner.events(), newcomer_started) if joiner else {},
        polls=polls,
        listed=listed,
        memory_bytes=memory,
        cores=cpu,
    )


def newcomer_figures(events: list[dict], started: float | None) -> dict:
    """Seconds from the newcomer's start to its first state load and to its first contributed round."""

    def first(kind: str, condition=lambda event: True) -> float | None:
        times = [e["time"] - started for e in events if e["event"] == kind and condition(e)]
        return times[0] if times and started is not None else None

    return dict(
        state_loaded_s=first("state_loaded"),
        first_round_s=first("epoch", lambda event: "succeeded" in event["rounds"]),
    )


def scale_row(result: dict) -> dict:
    """The figures of one swarm size (see the module's docstring)."""
    summaries = result["summaries"]
    epochs = [epoch for peer in summaries for epoch in peer["epochs"]]
    outcomes = [outcome for epoch in epochs for outcome in epoch["rounds"]]
    timings = [timing for epoch in epochs for timing in epoch["round_timings"]]
    lifetimes = [peer["training_ended"] - result["launched"] for peer in summaries]
    progress_reads = sum((Counter(peer["progress_reads"]) for peer in summaries), Counter())  # by source
    return dict(
        peers=result["peers"],
        target_group_size=result["target_group_size"],
        group_key_bits=result["group_key_bits"],
        device_seconds=result["device_seconds"],
        rounds=len(outcomes),
        succeeded=outcomes.count("succeeded") / len(outcomes) if outcomes else None,
        partial=outcomes.count("partial") / len(outcomes) if outcomes else None,
        failed=outcomes.count("failed") / len(outcomes) if outcomes else None,
        group_sizes=sorted({timing[0] for timing in timings}),
        # of the rounds with a group, those whose group held every peer of the swarm (hivemind forms
        # one group only when every peer's matchmaking overlaps; otherwise groups average apart)
        whole_swarm=sum(timing[0] >= result["peers"] for timing in timings) / len(timings) if timings else None,
        to_group_s=median([timing[1] for timing in timings]),
        allreduce_s=median([timing[2] for timing in timings]),
        allreduce_max_s=max((timing[2] for timing in timings), default=None),
        epoch_s=median(
            [later["time"] - earlier["time"] for peer in summaries for earlier, later in pairwise(peer["epochs"])]
        ),
        dht_requests_per_s=median(
            [sum(peer["dht_requests"].values()) / life for peer, life in zip(summaries, lifetimes)]
        ),
        dht_requests_by_kind_per_s={
            kind: median([peer["dht_requests"][kind] / life for peer, life in zip(summaries, lifetimes)])
            for kind in summaries[0]["dht_requests"]
        },
        summary_reads=progress_reads["summary"] / max(1, progress_reads.total()),
        memory_per_peer_mib=result["memory_bytes"] / result["peers"] / 2**20 if result["memory_bytes"] else None,
        cores_per_peer=result["cores"] / result["peers"] if result["cores"] else None,
        poll_s=median(result["polls"]),
        poll_max_s=max(result["polls"], default=None),
        listed_online=result["listed"],
        start_s=result["released"] - result["launched"],
        newcomer_state_loaded_s=result["newcomer"].get("state_loaded_s"),
        newcomer_first_round_s=result["newcomer"].get("first_round_s"),
    )


def show(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = {  # the table's columns: header, then the cell of a row
    "peers": lambda row: str(row["peers"]),
    "target group": lambda row: str(row["target_group_size"] or "all"),
    "matchmaking keys": lambda row: str(2 ** row.get("group_key_bits", 0)),
    "device s": lambda row: show(row.get("device_seconds", 0.0), 1),
    "rounds": lambda row: str(row["rounds"]),
    "averaged every part": lambda row: show(row["succeeded"], 3),
    "in one group of all": lambda row: show(row["whole_swarm"]),
    "group sizes": lambda row: ",".join(map(str, row["group_sizes"])),
    "to group s": lambda row: show(row["to_group_s"]),
    "all-reduce s (max)": lambda row: f"{show(row['allreduce_s'])} ({show(row['allreduce_max_s'])})",
    "epoch s": lambda row: show(row["epoch_s"]),
    "DHT req/s/peer": lambda row: show(row["dht_requests_per_s"], 1),
    "progress reads from the summary": lambda row: show(row.get("summary_reads")),
    "PSS/peer MiB": lambda row: show(row["memory_per_peer_mib"], 0),
    "cores/peer": lambda row: show(row["cores_per_peer"], 3),
    "coordinator poll s (max)": lambda row: f"{show(row['poll_s'], 3)} ({show(row['poll_max_s'], 3)})",
    "listed": lambda row: str(row["listed_online"]),
    "newcomer's first round s": lambda row: show(row["newcomer_first_round_s"], 1),
}


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(cell(row) for cell in COLUMNS.values()) + " |")


PLOTTED = {  # the plot's panels: title, then the figure of a row
    "epoch s (median)": "epoch_s",
    "rounds that averaged every part": "succeeded",
    "DHT requests per second per peer": "dht_requests_per_s",
    "PSS per peer, MiB": "memory_per_peer_mib",
}


def grouping(row: dict) -> tuple[int | None, int]:
    """A row's group settings: its target group size and matchmaking key bits (0 in runs before them)."""
    return row["target_group_size"], row.get("group_key_bits", 0)


def plot(path: Path) -> None:
    """Every saved run's figures against the swarm size, one line per run and group settings."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, panels = pyplot.subplots(2, 2, figsize=(10, 7))
    for saved in sorted(RESULTS.glob("scale-cpu-*.json")):
        rows = json.loads(saved.read_text(encoding="utf-8"))["rows"]
        for target, bits in dict.fromkeys(grouping(row) for row in rows):
            chosen = sorted((row for row in rows if grouping(row) == (target, bits)), key=lambda row: row["peers"])
            sizes = saved.stem.removeprefix("scale-cpu-").removesuffix("-device").removesuffix("-keys")
            label = f"{sizes} peers, groups of {target or 'all'}"
            label += f", {2**bits} keys" if bits else ""
            label += f", device {chosen[0]['device_seconds']:g} s" if chosen[0].get("device_seconds") else ""
            for axes, key in zip(panels.flat, PLOTTED.values()):
                axes.plot([row["peers"] for row in chosen], [row[key] for row in chosen], marker="o", label=label)
    for axes, title in zip(panels.flat, PLOTTED):
        axes.set_title(title)
        axes.set_xscale("log", base=2)
        axes.set_xlabel("peers")
        axes.grid(alpha=0.3)
    panels.flat[0].legend(fontsize="small")
    figure.suptitle("Starling swarms on one 2-core machine (tiny model, loopback)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers-list", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--epochs", type=int, default=10, help="epochs each swarm trains")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one swarm may take")
    parser.add_argument(
        "--target-group-sizes",
        type=int,
        nargs="+",
        default=[0],
        help="averaging.target_group_size values to measure each swarm size with (0: unset, one group of all)",
    )
    add_group_key_bits_argument(parser, "each swarm size")
    parser.add_argument(
        "--device-seconds",
        type=float,
        default=0.0,
        help="seconds each micro-batch's forward pass waits first, as on a device that leaves the CPU free "
        "(0: the peers compute on this machine's cores)",
    )
    parser.add_argument("--plot", action="store_true", help="only redraw results/scale.png from the saved runs")
    args = parser.parse_args()
    if args.plot:
        plot(RESULTS / "scale.png")
        print(f"written to {RESULTS / 'scale.png'}")
        return

    folder = Path(tempfile.mkdtemp(prefix="starling-scale-"))
    print(f"logs in {folder}", flush=True)
    rows = []
    for peers in args.peers_list:
        need = (peers + 1) * PEER_MEMORY
        if need > available_memory():
            sys.exit(f"{peers} peers need about {need / 2**30:.1f} GiB; {available_memory() / 2**30:.1f} GiB available")
        for target, bits in product([size or None for size in args.target_group_sizes], args.group_key_bits):
            name = f"{peers}-peers" + (f"-groups-of-{target}" if target else "") + (f"-keys-{2**bits}" if bits else "")
            try:
                result = run_scale(
                    folder / name,
                    peers,
                    args.epochs,
                    target,
                    bits,
                    timeout=args.timeout,
                    device_seconds=args.device_seconds,
                )
            except HarnessError as error:
                sys.exit(f"the swarm of {name} failed: {error}")
            rows.append(scale_row(result))
            print(rows[-1], flush=True)
    suffix = ("-keys" if any(args.group_key_bits) else "") + ("-device" if args.device_seconds else "")
    path = write_json(
        f"scale-cpu-{'-'.join(map(str, args.peers_list))}{suffix}.json",
        dict(preset="tiny", epochs=args.epochs, batch_size=BATCH_SIZE, command=" ".join(sys.argv[1:]), rows=rows),
    )
    print_table(rows)
    plot(RESULTS / "scale.png")
    print(f"written to {path} and {RESULTS / 'scale.png'}")


if __name__ == "__main__":
    main()
