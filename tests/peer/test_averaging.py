"""Averaging is right: in one collaborative step every peer receives the sample-weighted average of
all peers' gradients, within the codec's error, and takes the optimizer step on it; a peer in fp16
(loss-scaled gradients) and peers in fp32 average the same way."""

import sys
from pathlib import Path

import torch
from hivemind.optim import state_averager
from safetensors.torch import load_file

from coordinator.harness import PeerProcess, bootstrap_node, exit_statuses, release
from model import CausalLM
from peer.optimizer import lr_multiplier, make_inner_optimizer
from peer.run_config import RunConfig

WORKER = Path(__file__).with_name("averaging_worker.py")
MICRO_BATCHES = [4, 8, 12]
PRECISIONS = ["fp32", "fp16", "fp32"]  # the fp16 peer's gradients pass through its loss scale
# Relative error of the average per tensor: 8-bit codec for large tensors (measured 0.011-0.015:
# each value is quantised on its way to the reducer and again on its way back), fp16 for small ones.
EIGHT_BIT_TOLERANCE, FP16_TOLERANCE = 0.02, 2e-3


def test_three_peers_average_known_gradients(tmp_path, write_run_config):
    run_toml = write_run_config(
        tmp_path, target_batch_size=240, matchmaking_time=3.0, average_state_every=100
    )  # no state averaging: parameters show the step alone
    run = RunConfig.load(run_toml)
    folders, go = [tmp_path / f"peer{i}" for i in range(3)], tmp_path / "go"
    outputs = [folder / "result.safetensors" for folder in folders]
    with bootstrap_node() as address:
        workers = []
        for i, (folder, b, precision) in enumerate(zip(folders, MICRO_BATCHES, PRECISIONS)):
            folder.mkdir()
            arguments = [str(run_toml), address, str(i), str(b), precision, str(outputs[i]), str(go)]
            workers.append(PeerProcess(folder, [sys.executable, str(WORKER), *arguments]))
        release(workers, go)
        codes = exit_statuses(workers, timeout=240)
    assert codes == [0, 0, 0], [worker.log_tail() for worker in workers]
    results = [load_file(out) for out in outputs]

    torch.manual_seed(run.training.seed)
    reference = CausalLM(run.model_config())
    params = list(reference.parameters())
    weights = [int(r["steps"]) * b for r, b in zip(results, MICRO_BATCHES)]
    assert [int(r["rounds_succeeded"]) for r in results] == [1, 1, 1]
    # Each peer offers its training state to newcomers, and not its gradient buffers (which nobody loads).
    assert [(int(r["state_offers"]), int(r["gradient_offers"])) for r in results] == [(3, 0)] * 3

    from averaging_worker import known_gradient  # noqa: E402  (the workers' own definition)

    expected_grads = []
    for position, param in enumerate(params):
        total = sum(w * known_gradient(param, i, position) for i, w in enumerate(weights))
        expected_grads.append(total / sum(weights))

    # The optimizer step clips the averaged gradients in place, so the peers hold them clipped.
    total_norm = torch.stack([g.norm() for g in expected_grads]).norm()
    clip = min(1.0, run.training.max_grad_norm / (float(total_norm) + 1e-6))
    expected_clipped = [g * clip for g in expected_grads]
    threshold = run.averaging.compression_threshold
    for peer, result in enumerate(results):
        for position, expected in enumerate(expected_clipped):
            averaged = result[f"grad.{position}"]
            error = (averaged - expected).norm() / expected.norm()
            tolerance = EIGHT_BIT_TOLERANCE if expected.numel() >= threshold else FP16_TOLERANCE
            assert error < tolerance, (
                f"peer {peer}, parameter {position}: relative error {error:.4f} of the average "
                f"(norms {averaged.norm():.4g} received, {expected.norm():.4g} expected)"
            )

    # Each peer then took exactly the optimizer step on the average it received.
    before = [p.detach().clone() for p in params]
    for result in results:
        for param, start in zip(params, before):
            param.data.copy_(start)
        optimizer = make_inner_optimizer(params, run.training)
        for group in optimizer.param_groups:
            group["lr"] *= lr_multiplier(run.training)(0)
        # as hivemind does (a first step with zero gradients), with peer.hivemind_fixes applied: looked up
        # here, since a name imported before peer's modules would be hivemind's own
        state_averager.initialize_optimizer_state_(optimizer)
        for position, param in enumerate(params):
            param.grad = result[f"grad.{position}"]
        optimizer.step()
        for position, param in enumerate(params):
            torch.testing.assert_close(result[f"param.{position}"], param.detach(), atol=1e-6, rtol=1e-5)
