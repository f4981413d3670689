"""What the swarm is doing, from the signed records peers keep in the DHT.

Two kinds of records are read: hivemind's ProgressTracker records (`{training_key}_progress`, see
RunConfig.training_key: epoch, samples accumulated toward the next epoch, speed) and Starling's
peer metrics (`{run_id}_metrics`: name, device, loss, samples contributed; see peer/metrics.py).
Both are signed by their peers' keys and checked by the DHT's validators, so a forged record never gets this far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
from hivemind.optim.progress_tracker import LocalTrainingProgress

from coordinator.history import Contributor
from peer.metrics import PeerMetrics
from peer.progress import RECORD_PERIOD

# Seconds since a peer's last report for it to count as online: twice the longest a peer waits
# between two reports (an averaging round, which holds its reports back, can take 10 s and more).
ONLINE_WITHIN = 2 * RECORD_PERIOD.longest
STALE_WITHIN = 60.0  # ... and as stale; after that it is gone
LISTED_FOR = 3600.0  # gone peers stay in the peer table this long
KINDS = ("gpu", "cpu", "client", "auxiliary")
ROUND_OUTCOMES = ("succeeded", "partial", "failed")


def peer_kind(report: PeerMetrics) -> str:
    """One of KINDS: auxiliary and client-mode peers by their role, trainers by their device."""
    if report.auxiliary:
        return "auxiliary"
    if report.client_mode:
        return "client"
    return "gpu" if report.device == "cuda" else "cpu"


def peer_status(last_seen: float, now: float) -> str:
    age = now - last_seen
    return "online" if age <= ONLINE_WITHIN else "stale" if age <= STALE_WITHIN else "gone"


def read_progress(dht: hivemind.DHT, training_key: str) -> list[LocalTrainingProgress]:
    """The progress records of every peer of the run that is still publishing them."""
    found = dht.get(f"{training_key}_progress", latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    return [LocalTrainingProgress.parse_obj(entry.value) for entry in found.value.values() if entry.value is not None]


def received_bytes(dht: hivemind.DHT) -> int | None:
    """Bytes the DHT node has received so far: the reads of its libp2p daemon, the one child of the
    DHT's process (they include the DHT process's own small requests to it). None where the
    system does not count them (Linux's /proc does)."""
    try:
        daemons = [
            int(child)
            for task in Path(f"/proc/{dht.pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
        return sum(_read_chars(daemon) for daemon in daemons)
    except (OSError, ValueError):
        return None


def _read_chars(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise ValueError(f"no rchar in /proc/{pid}/io")


@dataclass
class SwarmState:
    epoch: int = 0
    target_batch_size: int = 0
    samples_this_epoch: int = 0
    eta_seconds: float | None = None
    loss: float | None = None
    samples_per_second: float = 0.0
    tokens_per_second: float = 0.0
    active_peers: dict[str, int] = field(default_factory=lambda: {"total": 0, **{kind: 0 for kind in KINDS}})
    # Gradient rounds of the online peers so far, by outcome (peer.averager.RoundOutcome)
    rounds: dict[str, int] = field(default_factory=lambda: {outcome: 0 for outcome in ROUND_OUTCOMES})
    peers: list[dict] = field(default_factory=list)


def summarize(
    progress: list[LocalTrainingProgress],
    reports: list[PeerMetrics],
    contributors: list[Contributor],
    target_batch_size: int,
    seq_len: int,
    known_epoch: int,
    now: float,
) -> SwarmState:
    """The swarm at a glance: the global epoch and how far the next one is, throughput, the loss
    (weighted by each peer's speed), active peers by kind, and the peer table."""
    state = SwarmState(target_batch_size=target_batch_size)
    state.epoch = max([known_epoch, *(p.epoch for p in progress)])
    state.samples_this_epoch = sum(p.samples_accumulated for p in progress if p.epoch == state.epoch)
    state.samples_per_second = sum(p.samples_per_second for p in progress)
    state.tokens_per_second = state.samples_per_second * seq_len
    if state.samples_per_second > 0:
        state.eta_seconds = max(0, target_batch_size - state.samples_this_epoch) / state.samples_per_second

    latest = {r.peer_id: r for r in reports}
    online = [r for r in latest.values() if peer_status(r.time, now) == "online"]
    for report in online:
        state.active_peers[peer_kind(report)] += 1
        for outcome in ROUND_OUTCOMES:
            state.rounds[outcome] += getattr(report, f"rounds_{outcome}")
    state.active_peers["total"] = len(online)
    trainers = [r for r in online if not r.auxiliary and math.isfinite(r.loss)]
    if trainers:
        weights = [max(r.samples_per_second, 1e-9) for r in trainers]
        state.loss = sum(w * r.loss for w, r in zip(weights, trainers)) / sum(weights)

    for contributor in contributors:
        if now - contributor.last_seen > LISTED_FOR:
            continue
        report = latest.get(contributor.peer_id)
        state.peers.append(
            {
                "peer_id": contributor.peer_id,
                "name": contributor.name,
                "kind": contributor.kind,
                "device": report.device if report else None,
                "device_name": contributor.device_name,
                "precision": report.precision if report else None,
                # What it minimises; a distilling peer also says from what ("teacher" or "top-K").
                "objective": (f"{report.objective} ({report.teacher})" if report.teacher else report.objective)
                if report
                else None,
                "client_mode": report.client_mode if report else contributor.kind == "client",
                "auxiliary": report.auxiliary if report else contributor.kind == "auxiliary",
                "epoch": report.epoch if report else None,
                "loss": report.loss if report and math.isfinite(report.loss) else None,
                "samples": contributor.samples,
                "samples_per_second": report.samples_per_second if report else 0.0,
                "micro_batch": report.micro_batch if report else None,
                "rounds": {outcome: getattr(report, f"rounds_{outcome}") for outcome in ROUND_OUTCOMES}
                if report
                else None,
                "inner_steps": report.inner_steps if report and report.mode == "diloco" else None,
                # What averaging costs it: bytes sent per sample contributed, and the share of its
                # training time spent computing (the rest mostly waits on the network).
                "bytes_per_sample": report.bytes_sent / report.samples_contributed
                if report and report.samples_contributed
                else None,
                "compute_share": report.compute_seconds / report.training_seconds
                if report and report.training_seconds > 0
                else None,
                "status": peer_status(contributor.last_seen, now),
                "first_seen": contributor.first_seen,
                "last_seen": contributor.last_seen,
                "online_seconds": contributor.online_seconds,
            }
        )
    return state
