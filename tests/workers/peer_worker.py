"""A peer process for the swarm tests, driven through the Python API.

    peer_worker.py SPEC_JSON

SPEC_JSON holds {"options": Peer keyword arguments, "duration": s, "max_epochs": n, "slow": s,
"out": folder, "start_after": file, "hold_until": file, "snapshots": bool, "die_in_round": n,
"drop_reducer_in_round": n, "model_overrides": {...}}.
- "slow", "die_in_round", "drop_reducer_in_round", "model_overrides": the faults of the peer's
  FaultPlan (peer.faults: slow_forward, die_in_round, drop_reducer_in_round, model_overrides), which
  write what they did into "out";
- "start_after": the peer joins only once that file exists;
- "hold_until": the peer joins, writes "joined" in its folder and starts training only once that
  file exists (so that peers of one test start training together, not one racing alone while
  another still joins).
The worker writes events.jsonl (peer.events), summary.json (with "processed": rows seen by forward)
and params.safetensors, and with "snapshots" the parameters of every epoch it reaches as
epoch-N.safetensors; in DiLoCo mode also, for the round that started at epoch N, its local
parameters before the outer step as round-N.safetensors and its averaging weight (samples) and
inner steps in round-N.json.
"""

import json
import sys
import time
from functools import partial
from pathlib import Path

from safetensors.torch import save_file

from model import CausalLM
from peer import Peer
from peer.command_line import setup_logging
from peer.faults import FaultPlan
from peer.peer import PeerCallbacks


def save_params(model: CausalLM, path: Path) -> None:
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, path)


def save_round(peer: Peer, out: Path) -> None:
    """DiLoCo: this peer's local parameters and averaging weight at the end of a round's inner steps."""
    epoch = peer.optimizer.local_epoch
    save_params(peer.model, out / f"round-{epoch}.safetensors")
    weight = peer.optimizer.grad_averager.local_samples_accumulated
    (out / f"round-{epoch}.json").write_text(json.dumps({"samples": weight, "inner_steps": peer.inner_steps}))


def at_start_line(peer: Peer, out: Path, release: Path | None, processed: list[int]) -> None:
    """Count the rows the peer's training forward passes see (into processed[0]); with a release
    file, say the peer has joined the run (its DHT, averagers and state are ready) and wait for it."""

    def count(model: CausalLM, args: tuple) -> None:
        if model.training:
            processed[0] += args[0].shape[0]

    peer.model.register_forward_pre_hook(count)
    if release is not None:
        (out / "joined").touch()
        while not release.exists():
            time.sleep(0.05)


def main() -> None:
    setup_logging("INFO")
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    while spec.get("start_after") and not Path(spec["start_after"]).exists():
        time.sleep(0.1)
    faults = FaultPlan(
        slow_forward=spec.get("slow") or 0.0,
        die_in_round=spec.get("die_in_round"),
        drop_reducer_in_round=spec.get("drop_reducer_in_round"),
        model_overrides=spec.get("model_overrides") or {},
        record_to=str(out),
    )
    callbacks = PeerCallbacks()
    if spec.get("snapshots"):
        callbacks.on_epoch = lambda peer: save_params(
            peer.model, out / f"epoch-{peer.optimizer.local_epoch}.safetensors"
        )
        callbacks.on_round_end = partial(save_round, out=out)
    peer = Peer(**spec["options"], events=str(out / "events.jsonl"), callbacks=callbacks, faults=faults)
    processed = [0]
    release = Path(spec["hold_until"]) if spec.get("hold_until") else None
    start_line = partial(at_start_line, out=out, release=release, processed=processed)
    summary = peer.run(
        duration=spec.get("duration"), max_epochs=spec.get("max_epochs"), start_line=start_line
    ).as_dict()
    summary["processed"] = processed[0]
    save_params(peer.model, out / "params.safetensors")
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
