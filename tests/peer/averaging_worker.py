"""One peer of the averaging test: contributes a known gradient until the first collaborative step.

Run as a process: averaging_worker.py RUN_TOML INITIAL_PEER INDEX MICRO_BATCH PRECISION OUT_FILE GO
Once in the run it waits at its start line (coordinator.harness.wait_at_start_line, in the folder of
OUT_FILE) until the test releases all three peers by creating GO; only then it contributes. The gradient comes from a
backward pass in PRECISION's way (peer.precision: in fp16, of the loss scaled by 2^16, then
unscaled), as a peer's gradients do.
"""

import sys
import time
from pathlib import Path

import hivemind
import torch
from safetensors.torch import save_file

from coordinator.harness import LOOPBACK_MADDR, wait_at_start_line
from model import CausalLM
from peer.averager import RoundOutcome
from peer.optimizer import make_collaborative_optimizer
from peer.precision import MixedPrecision
from peer.run_config import RunConfig
from peer.state_loading import state_offers


def known_gradient(param: torch.Tensor, index: int, position: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * index + position)
    return torch.randn(param.shape, generator=generator) * 1e-3 * (index + 1)


def main() -> None:
    run_toml, initial_peer, index, micro_batch, precision, out_file, go = sys.argv[1:]
    index, micro_batch = int(index), int(micro_batch)
    run = RunConfig.load(run_toml)
    torch.manual_seed(run.training.seed)
    model = CausalLM(run.model_config())
    precision = MixedPrecision(precision, torch.device("cpu"))
    dht = hivemind.DHT(initial_peers=[initial_peer], host_maddrs=[LOOPBACK_MADDR], start=True)
    opt = make_collaborative_optimizer(model, dht, run, micro_batch)
    wait_at_start_line(Path(out_file).parent, Path(go))
    steps = 0
    while opt.local_epoch == 0:
        params = list(model.parameters())
        for param in params:
            param.grad = None
        # A loss whose gradient is the known one.
        precision.backward(sum((param * known_gradient(param, index, p)).sum() for p, param in enumerate(params)))
        precision.unscale([param.grad for param in params])
        opt.step(batch_size=micro_batch)
        steps += 1
        time.sleep(0.1)
    opt.grad_averager.settle_rounds()
    with opt.grad_averager.get_tensors() as averaged:
        tensors = {f"grad.{i}": t.clone() for i, t in enumerate(averaged)}
    tensors.update({f"param.{i}": p.detach().clone() for i, p in enumerate(model.parameters())})
    tensors["steps"] = torch.tensor(steps)
    tensors["rounds_succeeded"] = torch.tensor(opt.grad_averager.rounds[RoundOutcome.SUCCEEDED])
    # Who offers state in the DHT: every peer's training state, no peer's gradient buffers.
    tensors["state_offers"] = torch.tensor(len(state_offers(dht, opt.state_averager.prefix)))
    tensors["gradient_offers"] = torch.tensor(len(state_offers(dht, opt.grad_averager.prefix)))
    save_file(tensors, out_file)
    opt.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
