"""Swarms of real peer processes on loopback, for benchmarks/swarm.py and benchmarks/convergence.py.

    python -m benchmarks.swarm_runs SPEC_JSON     # one peer; run_swarm() starts these

run_swarm() starts a hivemind DHT node for the peers to join through, then N peer processes
(this module as a script). Each builds its model, joins the swarm and waits at a start line
until all are ready; then all start training at once, so that training time excludes start-up
(imports, model build, DHT join). Each peer writes summary.json: its PeerSummary, when it
started and stopped training, and per epoch the time, its mean training loss over that epoch's
micro-batches, its counters and `step_seconds`: the time of the optimizer step that ended the
epoch (gradient all-reduce, update, state averaging: everything but forward and backward of that
micro-batch); peer 0 also writes params.safetensors when asked. Given a benchmarks.netlab.Lab,
run_swarm places peer i in the lab's host i and the DHT node on the lab's bridge.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from benchmarks.netlab import Lab
from coordinator.demo import stop
from peer import Peer, PeerError, hivemind_fixes
from peer.command_line import setup_logging
from peer.run_config import AveragingSection, DilocoSection, RunConfig

REPO = Path(__file__).resolve().parents[1]
START_LINE_TIMEOUT = 900.0  # seconds a ready peer waits to be released, or peers to get ready
POLL = 0.05  # seconds between two looks at the start line

RUN_TOML = """\
run_id = "{run_id}"
[model]
preset = "{preset}"
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
{diloco_section}"""
DILOCO_SECTION = """\
[diloco]
samples_per_round = {samples_per_round}
inner_batch_size = {inner_batch_size}
compression = "{diloco_compression}"
"""


@dataclass
class RunSettings:
    """The run configuration a benchmark swarm trains with; other keys keep their defaults."""

    preset: str = "demo"
    seq_len: int = 128
    target_batch_size: int = 64
    lr: float = 2e-3
    warmup_epochs: int = 10
    total_epochs: int = 1000
    matchmaking_time: float = 5.0
    compression: str = "adaptive-8bit"
    average_state_every: int = AveragingSection.average_state_every
    data: str | None = None  # a text file or folder; None: the bundled corpus
    mode: str = "batch"  # or "diloco", with the [diloco] settings below
    samples_per_round: int = DilocoSection.samples_per_round
    inner_batch_size: int = DilocoSection.inner_batch_size
    diloco_compression: str = DilocoSection.compression

    @property
    def samples_per_epoch(self) -> int:
        return self.samples_per_round if self.mode == "diloco" else self.target_batch_size

    def write(self, path: Path, run_id: str) -> Path:
        """Write run.toml for this run and check it as a peer would."""
        data_line = "" if self.data is None else f"path = {json.dumps(self.data)}"
        values = {key: value for key, value in vars(self).items() if key != "data"}
        diloco_section = DILOCO_SECTION.format(**values) if self.mode == "diloco" else ""
        path.write_text(RUN_TOML.format(run_id=run_id, data_line=data_line, diloco_section=diloco_section, **values))
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


# ---- the peer process ----------------------------------------------------------------------


class BenchmarkPeer(Peer):
    """A Peer that waits at a start line once it has joined, and keeps a record of each epoch."""

    def __init__(self, ready: Path, go: Path, **options: Any) -> None:
        super().__init__(**options)
        self.ready, self.go = ready, go
        self.training_started = self.training_ended = None
        self.epochs: list[dict] = []
        self._losses: list[float] = []
        self._step_seconds = 0.0

    def _start_optimizer(self) -> None:
        super()._start_optimizer()
        self.ready.touch()
        deadline = time.monotonic() + START_LINE_TIMEOUT
        while not self.go.exists():
            if time.monotonic() > deadline:
                raise PeerError(f"not released from the start line within {START_LINE_TIMEOUT:.0f} s")
            time.sleep(POLL)

    def _loop(self, started: float, duration: float | None, max_epochs: int | None) -> None:
        self.training_started = time.time()
        try:
            super()._loop(started, duration, max_epochs)
        finally:
            self.training_ended = time.time()

    def _train_micro_batch(self, epoch: int) -> int:
        began, computed = time.perf_counter(), self.compute_seconds
        contributed = super()._train_micro_batch(epoch)
        self._step_seconds = time.perf_counter() - began - (self.compute_seconds - computed)
        if contributed:
            self._losses.append(self.last_loss)
        return contributed

    def _after_epoch(self) -> None:
        super()._after_epoch()
        self.epochs.append(
            dict(
                epoch=self.optimizer.local_epoch,
                time=time.time(),
                micro_batches=len(self._losses),
                train_loss=statistics.fmean(self._losses) if self._losses else None,
                samples_contributed=self.samples_contributed,
                compute_seconds=self.compute_seconds,
                step_seconds=self._step_seconds,
            )
        )
        self._losses = []


def worker(spec_path: Path) -> None:
    """Run one peer as the spec says and write what it did to summary.json in its folder."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    setup_logging("INFO")
    out = Path(spec["out"])
    if not spec["hivemind_fixes"]:
        hivemind_fixes.revert()
    peer = BenchmarkPeer(ready=out / "ready", go=Path(spec["go"]), **spec["options"])
    summary = peer.run(max_epochs=spec["max_epochs"]).as_dict()
    if peer.training_started is None:
        sys.exit("the peer stopped before training")
    if spec["save_params"]:
        save_file(
            {name: p.detach().cpu().contiguous() for name, p in peer.model.named_parameters()},
            out / "params.safetensors",
        )
    summary.update(
        micro_batch=peer.micro_batch,
        training_started=peer.training_started,
        training_ended=peer.training_ended,
        epochs=peer.epochs,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


# ---- the benchmark's side ------------------------------------------------------------------


def log_tail(folder: Path) -> str:
    return (folder / "log.txt").read_text()[-3000:]


def run_swarm(folder: Path, run_toml: Path, options: SwarmOptions, max_epochs: int, lab: Lab | None = None) -> dict:
    """Train a fresh swarm of options.peers peers for max_epochs epochs, on loopback or in `lab`
    (one host per peer). Returns when the peers were launched and released (time.time()) and
    each peer's summary.json; peer 0's folder holds params.safetensors. Logs stay in `folder`."""
    import hivemind  # the benchmark's own process needs it only here

    folder.mkdir(parents=True, exist_ok=True)
    go = folder / "go"
    bootstrap = hivemind.DHT(host_maddrs=[lab.maddr() if lab else "/ip4/127.0.0.1/tcp/0"], start=True)
    processes: list[subprocess.Popen] = []
    peer_folders = [folder / f"peer-{index}" for index in range(options.peers)]
    try:
        launched = time.time()
        for index, out in enumerate(peer_folders):
            out.mkdir()
            command = [sys.executable, "-m", "benchmarks.swarm_runs", str(out / "spec.json")]
            host_maddr = "/ip4/127.0.0.1/tcp/0"
            if lab is not None:
                command, host_maddr = lab.hosts[index].command(command), lab.hosts[index].maddr()
            spec = dict(
                out=str(out),
                go=str(go),
                threads=options.threads,
                max_epochs=max_epochs,
                save_params=index == 0,
                hivemind_fixes=options.hivemind_fixes,
                options=dict(
                    initial_peers=[str(bootstrap.get_visible_maddrs()[0])],
                    config=str(run_toml),
                    batch_size=options.batch_size,
                    device=options.device,
                    name=f"peer-{index}",
                    host_maddrs=[host_maddr],
                ),
            )
            (out / "spec.json").write_text(json.dumps(spec))
            with open(out / "log.txt", "w") as log:
                # A session of its own, so that stop() reaches hivemind's helper processes too.
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env={**os.environ, "OMP_NUM_THREADS": str(options.threads)},
                    )
                )
        deadline = time.monotonic() + min(options.timeout, START_LINE_TIMEOUT)
        while not all((out / "ready").exists() for out in peer_folders):
            for process, out in zip(processes, peer_folders):
                if process.poll() is not None:
                    sys.exit(f"{out.name} stopped while starting; see {out}/log.txt:\n{log_tail(out)}")
            if time.monotonic() > deadline:
                sys.exit(f"the peers did not get ready in time; see {folder}")
            time.sleep(POLL)
        released = time.time()
        go.touch()
        deadline = time.monotonic() + options.timeout - (released - launched)
        for process, out in zip(processes, peer_folders):
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sys.exit(f"the swarm did not finish within {options.timeout:.0f} s; see {folder}")
            if code != 0:
                sys.exit(f"{out.name} exited with status {code}; see {out}/log.txt:\n{log_tail(out)}")
    finally:
        stop(processes)
        bootstrap.shutdown()
    return dict(
        launched=launched,
        released=released,
        peers=[json.loads((out / "summary.json").read_text()) for out in peer_folders],
    )


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
