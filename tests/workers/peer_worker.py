"""A peer process for the swarm tests, driven through the Python API.

    peer_worker.py SPEC_JSON

SPEC_JSON holds {"options": Peer keyword arguments, "duration": s, "max_epochs": n, "slow": s,
"out": folder, "start_after": file, "hold_until": file, "snapshots": bool, "die_in_round": n,
"model_overrides": {...}}. With "slow", every forward pass first sleeps that long (an injected slow
device); with "start_after", the peer joins only once that file exists; with "hold_until", the peer
joins, writes "joined" in its folder and starts training only once that file exists (so that peers
of one test start training together, not one racing alone while another still joins); with "die_in_round", the peer's gradient averager SIGKILLs the worker's whole
session (worker, averagers, p2p daemon: a machine lost) right after it sent its first part of its
n-th all-reduce round; with "model_overrides", the peer builds its model with those config fields
changed while it keeps the run's configuration (a tampered client).
The worker writes summary.json (with "processed": rows seen by forward) and params.safetensors, and
with "snapshots" the parameters of every epoch it reaches as epoch-N.safetensors.
"""

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from peer import Peer
from peer import averager
from peer.run_config import RunConfig
from model import CausalLM, ModelConfig


def save_params(model: CausalLM, path: Path) -> None:
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, path)


def die_in_round(round_number: int) -> None:
    """Make the gradient averager (a forked process) kill the whole peer in the middle of a round."""
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
                    logging.getLogger(__name__).info(f"dying in all-reduce round {DyingRunner.rounds}")
                    os.killpg(0, signal.SIGKILL)

    averager.RUNNERS["centered-clip"] = DyingRunner


def tamper_model(overrides: dict) -> None:
    """Build the model with overrides the run's configuration does not have."""
    original = RunConfig.model_config
    RunConfig.model_config = lambda self: ModelConfig.from_dict({**original(self).to_dict(), **overrides})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    while spec.get("start_after") and not Path(spec["start_after"]).exists():
        time.sleep(0.1)
    if spec.get("die_in_round"):
        die_in_round(spec["die_in_round"])
    if spec.get("model_overrides"):
        tamper_model(spec["model_overrides"])
    peer = Peer(**spec["options"])
    if spec.get("hold_until"):
        (out / "joined").touch()
        while not Path(spec["hold_until"]).exists():
            time.sleep(0.05)
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
    if spec.get("snapshots"):
        original_after_epoch = Peer._after_epoch

        def after_epoch_with_snapshot(self):
            original_after_epoch(self)
            save_params(self.model, out / f"epoch-{self.optimizer.local_epoch}.safetensors")

        Peer._after_epoch = after_epoch_with_snapshot
    summary = peer.run(duration=spec.get("duration"), max_epochs=spec.get("max_epochs")).as_dict()
    summary["processed"] = processed
    save_params(peer.model, out / "params.safetensors")
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
