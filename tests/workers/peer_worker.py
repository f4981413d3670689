"""A peer process for the swarm tests, driven through the Python API.

    peer_worker.py SPEC_JSON

SPEC_JSON holds {"options": Peer keyword arguments, "duration": s, "max_epochs": n, "slow": s,
"out": folder, "start_after": file, "snapshots": bool}. With "slow", every forward pass first sleeps
that long (an injected slow device); with "start_after", the peer joins only once that file exists.
The worker writes summary.json (with "processed": rows seen by forward) and params.safetensors, and
with "snapshots" the parameters of every epoch it reaches as epoch-N.safetensors.
"""

import json
import logging
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from peer import Peer
from model import CausalLM


def save_params(model: CausalLM, path: Path) -> None:
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    while spec.get("start_after") and not Path(spec["start_after"]).exists():
        time.sleep(0.1)
    peer = Peer(**spec["options"])
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
