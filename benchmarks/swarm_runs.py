"""Swarms of real peer processes, for the swarm, convergence, rounds and WAN benchmarks.

run_swarm() starts a hivemind DHT node for the peers to join through, then N harness peers
(coordinator.harness). Each builds its model, joins the swarm and waits at a start line until all
are ready; then all start training at once, so that training time excludes start-up (imports,
model build, DHT join). Each peer's summary holds its PeerSummary, when it started and stopped
training, and its epoch events (peer.events): per epoch the time, its mean training loss over that
epoch's micro-batches, its counters and `step_seconds`, the time of the optimizer step that ended
the epoch (gradient all-reduce, update, state averaging). Given a benchmarks.netlab.Lab, run_swarm
places peer i in the lab's host i and the DHT node on the lab's bridge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.netlab import Lab
from coordinator.harness import LOOPBACK_MADDR, HarnessError, PeerProcess, PeerSpec, bootstrap_node, release, stop_all
from peer.run_config import AveragingSection, CoordinatorSection, DilocoSection, RunConfig

START_LINE_TIMEOUT = 900.0  # seconds for the peers to get ready

RUN_TOML = """\
run_id = "{run_id}"
[model]
preset = "{preset}"
{overrides_line}
[data]
seq_len = {seq_len}
{data_line}
[training]
mode = "{mode}"
target_batch_size = {target_batch_size}
lr = {lr}
warmup_epochs = {warmup_epochs}
total_epochs = {total_epochs}
[averaging]
matchmaking_time = {matchmaking_time}
compression = "{compression}"
average_state_every = {average_state_every}
group_key_bits = {group_key_bits}
{group_line}
{diloco_section}[coordinator]
poll_mbit = {poll_mbit}
"""
DILOCO_SECTION = """\
[diloco]
samples_per_round = {samples_per_round}
inner_batch_size = {inner_batch_size}
compression = "{diloco_compression}"
overlap = {overlap_toml}
outer_lr = {outer_lr}
outer_momentum = {outer_momentum}
"""


@dataclass
class RunSettings:
    """The run configuration a benchmark swarm trains with; other keys keep their defaults."""

    preset: str = "demo"
    model_overrides: dict[str, int] = field(default_factory=dict)  # [model] overrides of the preset's sizes
    seq_len: int = 128
    target_batch_size: int = 64
    lr: float = 2e-3
    warmup_epochs: int = 10
    total_epochs: int = 1000
    matchmaking_time: float = 5.0
    compression: str = "adaptive-8bit"
    average_state_every: int = AveragingSection.average_state_every
    target_group_size: int | None = AveragingSection.target_group_size
    group_key_bits: int = AveragingSection.group_key_bits
    data: str | None = None  # a text file or folder; None: the bundled corpus
    mode: str = "batch"  # or "diloco", with the [diloco] settings below
    samples_per_round: int = DilocoSection.samples_per_round
    inner_batch_size: int = DilocoSection.inner_batch_size
    diloco_compression: str = DilocoSection.compression
    overlap: bool = DilocoSection.overlap
    outer_lr: float = DilocoSection.outer_lr
    outer_momentum: float = DilocoSection.outer_momentum
    poll_mbit: float = CoordinatorSection.poll_mbit

    @property
    def samples_per_epoch(self) -> int:
        return self.samples_per_round if self.mode == "diloco" else self.target_batch_size

    def write(self, path: Path, run_id: str) -> Path:
        """Write run.toml for this run and check it as a peer would."""
        data_line = "" if self.data is None else f"path = {json.dumps(self.data)}"
        overrides = ", ".join(f"{key} = {json.dumps(value)}" for key, value in self.model_overrides.items())
        overrides_line = f"overrides = {{ {overrides} }}" if overrides else ""
        values = {key: value for key, value in vars(self).items() if key not in ("data", "model_overrides")}
        overlap_toml = json.dumps(self.overlap)
        diloco_section = DILOCO_SECTION.format(overlap_toml=overlap_toml, **values) if self.mode == "diloco" else ""
        path.write_text(
            RUN_TOML.format(
                run_id=run_id,
                data_line=data_line,
                overrides_line=overrides_line,
                diloco_section=diloco_section,
                group_line="" if self.target_group_size is None else f"target_group_size = {self.target_group_size}",
                **values,
            )
        )
        RunConfig.load(path)
        return path


@dataclass
class SwarmOptions:
    """How the peers of a benchmark swarm run on this machine."""

    peers: int = 2
    batch_size: int = 4  # micro-batch of each peer
    threads: int = 1  # torch threads per peer
    device: str = "cpu"
    timeout: float = 3600.0  # seconds one swarm may take, start-up included
    hivemind_fixes: bool = True  # False: peers run hivemind's own code where peer.hivemind_fixes corrects it


def add_swarm_arguments(parser: argparse.ArgumentParser, peers: int) -> None:
    """Options both benchmarks share: the model and data, and how peers run here."""
    add = parser.add_argument
    add("--preset", default="demo", help="model preset (model/config.py); tiny for a quick check")
    add("--peers", type=int, default=peers, help="peer processes in the swarm")
    add("--batch-size", type=int, default=4, help="micro-batch of each peer")
    add("--seq-len", type=int, default=128, help="tokens per sample")
    add("--lr", type=float, default=2e-3)
    add("--matchmaking-time", type=float, default=5.0, help="seconds peers wait to form an averaging group")
    add(
        "--average-state-every",
        type=int,
        default=AveragingSection.average_state_every,
        help="epochs between two averagings of parameters and optimizer state",
    )
    add("--threads", type=int, default=1, help="torch threads per peer")
    add("--device", default="cpu", help="cpu or cuda[:N], for every peer")
    add("--timeout", type=float, default=3600.0, help="seconds one swarm may take before the benchmark gives up")


def add_overlap_argument(parser: argparse.ArgumentParser) -> None:
    """--overlap: the DiLoCo swarms to measure, without ("off") and/or with ("on") overlap."""
    parser.add_argument(
        "--overlap", nargs="+", choices=["off", "on"], default=["off"], help="DiLoCo swarms without and/or with overlap"
    )


def add_group_key_bits_argument(parser: argparse.ArgumentParser, swarms: str) -> None:
    """--group-key-bits: the averaging.group_key_bits values (2^bits matchmaking keys, Moshpit
    averaging) that `swarms` (what the benchmark runs once per value) are measured with."""
    parser.add_argument(
        "--group-key-bits",
        type=int,
        nargs="+",
        default=[AveragingSection.group_key_bits],
        help=f"{swarms} under 2^bits matchmaking keys (averaging.group_key_bits, Moshpit averaging)",
    )


def swarm_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the shared options (add_swarm_arguments), as each benchmark's results record them."""
    shared = argparse.ArgumentParser(add_help=False)
    add_swarm_arguments(shared, peers=0)
    return {name: getattr(args, name) for name in vars(shared.parse_args([]))}


def run_settings(args: argparse.Namespace, **fields: Any) -> RunSettings:
    """RunSettings from the shared options (add_swarm_arguments) and the benchmark's own fields."""
    return RunSettings(
        preset=args.preset,
        seq_len=args.seq_len,
        lr=args.lr,
        matchmaking_time=args.matchmaking_time,
        average_state_every=args.average_state_every,
        **fields,
    )


def swarm_options(args: argparse.Namespace) -> SwarmOptions:
    return SwarmOptions(
        peers=args.peers, batch_size=args.batch_size, threads=args.threads, device=args.device, timeout=args.timeout
    )


def run_swarm(folder: Path, run_toml: Path, options: SwarmOptions, max_epochs: int, lab: Lab | None = None) -> dict:
    """Train a fresh swarm of options.peers harness peers for max_epochs epochs, on loopback or in
    `lab` (one host per peer), released together once all have joined. Returns when the peers were
    launched and released (time.time()) and each peer's summary (coordinator.harness_peer: with its
    epoch events and when it started and stopped training); peer 0's folder holds
    params.safetensors. Logs stay in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    peers: list[PeerProcess] = []
    with bootstrap_node(lab.maddr() if lab else LOOPBACK_MADDR) as address:
        try:
            launched = time.time()
            for index in range(options.peers):
                spec = PeerSpec(
                    options=dict(
                        initial_peers=[address],
                        config=str(run_toml),
                        batch_size=options.batch_size,
                        device=options.device,
                        name=f"peer-{index}",
                        host_maddrs=[lab.hosts[index].maddr() if lab else LOOPBACK_MADDR],
                    ),
                    max_epochs=max_epochs,
                    hold_until=str(folder / "go"),
                    threads=options.threads,
                    hivemind_fixes=options.hivemind_fixes,
                )
                wrap = lab.hosts[index].command([]) if lab else ()
                peers.append(PeerProcess.harness_peer(folder / f"peer-{index}", spec, wrap))
            released = release(peers, folder / "go", timeout=min(options.timeout, START_LINE_TIMEOUT))
            deadline = time.monotonic() + options.timeout - (released - launched)
            summaries = [peer.wait(timeout=max(1.0, deadline - time.monotonic())) for peer in peers]
        except HarnessError as error:
            sys.exit(f"the swarm in {folder} failed: {error}")
        finally:
            stop_all(peers)
    return dict(launched=launched, released=released, peers=summaries)
