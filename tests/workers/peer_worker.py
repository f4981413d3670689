"""A peer process for the swarm tests, driven through the Python API.

    peer_worker.py SPEC_JSON

SPEC_JSON holds {"options": Peer keyword arguments, "duration": s, "max_epochs": n, "slow": s,
"out": folder, "start_after": file, "hold_until": file, "snapshots": bool, "die_in_round": n,
"drop_reducer_in_round": n, "model_overrides": {...}}.
- "slow": every forward pass first sleeps that long (an injected slow device);
- "start_after": the peer joins only once that file exists;
- "hold_until": the peer joins, writes "joined" in its folder and starts training only once that
  file exists (so that peers of one test start training together, not one racing alone while
  another still joins);
- "die_in_round": the peer's gradient averager SIGKILLs the worker's whole session (worker,
  averagers, p2p daemon: a machine lost) right after it sent its first part of its n-th all-reduce
  round, writing n to died_in_round.txt first;
- "drop_reducer_in_round": the peer abandons its exchange with one reducer in its n-th round (a
  partial round);
- "model_overrides": the peer builds its model with those config fields changed while it keeps the
  run's configuration (a tampered client).
The worker writes events.jsonl (peer.events), summary.json (with "processed": rows seen by forward)
and params.safetensors, and with "snapshots" the parameters of every epoch it reaches as
epoch-N.safetensors; in DiLoCo mode also, for the round that started at epoch N, its local
parameters before the outer step as round-N.safetensors and its averaging weight (samples) and
inner steps in round-N.json.
"""

import json
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

from safetensors.torch import save_file

from model import CausalLM, ModelConfig
from peer import Peer, averager
from peer.command_line import setup_logging
from peer.peer import PeerCallbacks
from peer.run_config import RunConfig


def save_params(model: CausalLM, path: Path) -> None:
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, path)


def save_round(peer: Peer, out: Path) -> None:
    """DiLoCo: this peer's local parameters and averaging weight at the end of a round's inner steps."""
    epoch = peer.optimizer.local_epoch
    save_params(peer.model, out / f"round-{epoch}.safetensors")
    weight = peer.optimizer.grad_averager.local_samples_accumulated
    (out / f"round-{epoch}.json").write_text(json.dumps({"samples": weight, "inner_steps": peer.inner_steps}))


def die_in_round(round_number: int, out: Path) -> None:
    """Make the gradient averager (a forked process) kill the whole peer in the middle of a round,
    after writing the round's number to died_in_round.txt."""
    base = averager.RUNNERS["centered-clip"]

    class DyingRunner(base):
        rounds = 0

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            DyingRunner.rounds += 1

        async def _generate_input_for_peer(self, peer_index: int):
            async for message in super()._generate_input_for_peer(peer_index):
                yield message
                if DyingRunner.rounds >= round_number:
                    (out / "died_in_round.txt").write_text(str(DyingRunner.rounds))
                    os.killpg(0, signal.SIGKILL)

    averager.RUNNERS["centered-clip"] = DyingRunner


def drop_reducer_in_round(round_number: int, out: Path) -> None:
    """In its n-th all-reduce round, make the peer abandon its exchange with one other reducer before
    sending it anything: that reducer's parts of the peer's tensors stay the peer's own (a partial
    round for this peer alone), and the fraction it should report goes to expected_fraction.txt."""
    base = averager.RUNNERS["centered-clip"]

    class DroppingRunner(base):
        rounds = 0

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            DroppingRunner.rounds += 1
            others = [peer for peer in self.ordered_peer_ids if peer != self.peer_id]
            self.dropped = others[0] if DroppingRunner.rounds == round_number else None

        async def _communicate_with_peer(self, peer_id):
            if peer_id == self.dropped:
                parts = self.tensor_part_container
                index = self.ordered_peer_ids.index(peer_id)
                dropped = sum(part.numel() for part, _ in parts._input_parts_by_peer[index])
                (out / "expected_fraction.txt").write_text(repr(1.0 - dropped / parts.total_size))
                logging.getLogger(__name__).info(f"dropping reducer {peer_id} in all-reduce round {self.rounds}")
                parts.register_failed_reducer(index)
                return
            await super()._communicate_with_peer(peer_id)

    averager.RUNNERS["centered-clip"] = DroppingRunner


def tamper_model(overrides: dict) -> None:
    """Build the model with overrides the run's configuration does not have."""
    original = RunConfig.model_config
    RunConfig.model_config = lambda self: ModelConfig.from_dict({**original(self).to_dict(), **overrides})


def wait_at_start_line(peer: Peer, out: Path, release: Path) -> None:
    """Say the peer has joined the run (its DHT, averagers and state are ready), then wait for the
    release file."""
    (out / "joined").touch()
    while not release.exists():
        time.sleep(0.05)


def main() -> None:
    setup_logging("INFO")
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    while spec.get("start_after") and not Path(spec["start_after"]).exists():
        time.sleep(0.1)
    if spec.get("die_in_round"):
        die_in_round(spec["die_in_round"], out)
    if spec.get("drop_reducer_in_round"):
        drop_reducer_in_round(spec["drop_reducer_in_round"], out)
    if spec.get("model_overrides"):
        tamper_model(spec["model_overrides"])
    callbacks = PeerCallbacks()
    if spec.get("snapshots"):
        callbacks.on_epoch = lambda peer: save_params(
            peer.model, out / f"epoch-{peer.optimizer.local_epoch}.safetensors"
        )
        callbacks.on_round_end = partial(save_round, out=out)
    peer = Peer(**spec["options"], events=str(out / "events.jsonl"), callbacks=callbacks)
    processed = 0
    original_forward = CausalLM.forward

    def counted_forward(self, input_ids, *args, **kwargs):
        nonlocal processed
        if spec.get("slow"):
            time.sleep(spec["slow"])
        if self.training:
            processed += input_ids.shape[0]
        return original_forward(self, input_ids, *args, **kwargs)

    CausalLM.forward = counted_forward
    start_line = (
        partial(wait_at_start_line, out=out, release=Path(spec["hold_until"])) if spec.get("hold_until") else None
    )
    summary = peer.run(
        duration=spec.get("duration"), max_epochs=spec.get("max_epochs"), start_line=start_line
    ).as_dict()
    summary["processed"] = processed
    save_params(peer.model, out / "params.safetensors")
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
