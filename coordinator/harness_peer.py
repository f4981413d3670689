"""The peer process the swarm harness starts (coordinator.harness.PeerProcess.harness_peer).

    python -m coordinator.harness_peer SPEC_JSON

SPEC_JSON is a coordinator.harness.PeerSpec. The peer runs through the Python API with the spec's
FaultPlan (peer.faults), and writes into the spec's folder (the folder of SPEC_JSON):
- events.jsonl: the peer's event stream (peer.events);
- ready: it has joined the run (DHT, averagers and state ready) and waits for `hold_until`;
- summary.json: its PeerSummary, with "processed" (rows its training forward passes saw),
  "micro_batch", "training_started" and "training_ended" (Unix seconds: from its start line to its
  last epoch), "epochs" (its epoch events) and "dht_requests" (the requests its DHT node sent, by
  kind: pings, stores and finds);
- params.safetensors: its parameters at the end;
- with "snapshots": epoch-N.safetensors, its parameters on reaching epoch N, and in DiLoCo mode for
  the round that started at epoch N its local parameters before the outer step (round-N.safetensors)
  and its averaging weight and inner steps (round-N.json).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing
import sys
import time
from functools import partial
from pathlib import Path

import torch
from hivemind.dht.protocol import DHTProtocol
from safetensors.torch import save

from coordinator.harness import PeerSpec, snapshot_name, wait_at_start_line
from model import CausalLM
from model.prepared import write_atomic
from peer import Peer, hivemind_fixes
from peer.command_line import env_default, setup_logging
from peer.events import read_events
from peer.faults import FaultPlan
from peer.peer import PeerCallbacks


def save_params(model: CausalLM, path: Path) -> None:
    """The model's parameters, written whole or not at all: tests read a snapshot once it exists."""
    write_atomic(path, save({name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}))


def save_round(peer: Peer, out: Path) -> None:
    """DiLoCo: this peer's local parameters and averaging weight at the end of a round's inner steps."""
    epoch = peer.optimizer.local_epoch
    save_params(peer.model, out / f"round-{epoch}.safetensors")
    weight = peer.optimizer.grad_averager.local_samples_accumulated
    (out / f"round-{epoch}.json").write_text(json.dumps({"samples": weight, "inner_steps": peer.inner_steps}))


class StartLine:
    """Called by Peer.run once the peer has joined: counts the rows its training forward passes see,
    and with a hold file says the peer is ready and waits until that file exists."""

    def __init__(self, out: Path, hold_until: Path | None) -> None:
        self.out, self.hold_until = out, hold_until
        self.processed = 0
        self.crossed: float | None = None  # when training started (time.time())

    def __call__(self, peer: Peer) -> None:
        peer.model.register_forward_pre_hook(self._count)
        if self.hold_until is not None:
            wait_at_start_line(self.out, self.hold_until)
        self.crossed = time.time()

    def _count(self, model: CausalLM, args: tuple) -> None:
        if model.training:
            self.processed += args[0].shape[0]


DHT_REQUESTS = ("call_ping", "call_store", "call_find")  # hivemind.dht.protocol.DHTProtocol's


def count_dht_requests():
    """Counters of the requests this peer's DHT node sends, one per kind (DHT_REQUESTS), shared with
    the DHT's process, which hivemind forks from this one once the peer starts it."""
    counters = multiprocessing.get_context("fork").Array(ctypes.c_uint64, len(DHT_REQUESTS))

    def counted(index: int, send):
        async def send_counted(self, *args, **kwargs):
            with counters.get_lock():
                counters[index] += 1
            return await send(self, *args, **kwargs)

        return send_counted

    for index, name in enumerate(DHT_REQUESTS):
        setattr(DHTProtocol, name, counted(index, getattr(DHTProtocol, name)))
    return counters


def read_spec(path: Path) -> PeerSpec:
    """The spec coordinator.harness.write_spec wrote, its faults a FaultPlan again (empty if none)."""
    fields = json.loads(path.read_text())
    return PeerSpec(**{**fields, "faults": FaultPlan(**(fields["faults"] or {}))})


def run(spec_path: Path) -> None:
    """Run the harness peer that the spec at `spec_path` describes, in this process."""
    spec = read_spec(spec_path)
    out = spec_path.parent
    torch.set_num_threads(spec.threads)
    setup_logging(env_default("--log-level", "INFO"))  # STARLING_LOG_LEVEL, as for starling-peer
    if not spec.hivemind_fixes:
        hivemind_fixes.revert()
    while spec.start_after and not Path(spec.start_after).exists():
        time.sleep(0.1)
    callbacks = PeerCallbacks()
    if spec.snapshots:
        callbacks.on_epoch = lambda peer: save_params(peer.model, out / snapshot_name(peer.optimizer.local_epoch))
        callbacks.on_round_end = partial(save_round, out=out)
        callbacks.on_state_loaded = lambda peer: save_params(
            peer.model, out / snapshot_name(peer.optimizer.local_epoch, loaded=True)
        )
    events = out / "events.jsonl"
    dht_requests = count_dht_requests()
    faults = dataclasses.replace(spec.faults, record_to=str(out))
    peer = Peer(**spec.options, events=str(events), callbacks=callbacks, faults=faults)
    start_line = StartLine(out, Path(spec.hold_until) if spec.hold_until else None)
    summary = peer.run(duration=spec.duration, max_epochs=spec.max_epochs, start_line=start_line).as_dict()
    if start_line.crossed is None:
        sys.exit("the peer stopped before training")
    epochs = [event for event in read_events(events) if event["event"] == "epoch"]
    summary.update(
        processed=start_line.processed,
        micro_batch=peer.micro_batch,
        training_started=start_line.crossed,
        training_ended=epochs[-1]["time"] if epochs else start_line.crossed,
        epochs=epochs,
        dht_requests=dict(zip(DHT_REQUESTS, dht_requests[:])),
    )
    save_params(peer.model, out / "params.safetensors")
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
