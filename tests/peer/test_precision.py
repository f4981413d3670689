"""Precision by capability: fp32 on CPU unless asked, fp16 with a dynamic loss scale whose
gradients reach the optimizer unscaled, and an overflowing micro-batch that is skipped."""

import pytest
import torch

from model import CausalLM, ModelConfig
from peer.faults import FaultPlan
from peer.precision import MixedPrecision, choose_precision

CPU = torch.device("cpu")


def test_the_precision_follows_the_device_unless_asked():
    assert choose_precision("auto", CPU) == "fp32"
    assert choose_precision("fp16", CPU) == "fp16"
    with pytest.raises(ValueError, match="--precision fp8"):
        choose_precision("fp8", CPU)


def gradients(model: CausalLM, batch: torch.Tensor, precision: MixedPrecision) -> list[torch.Tensor]:
    """One micro-batch's gradients as the peer hands them to its optimizer."""
    model.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = model(batch, labels=batch).loss
    precision.backward(loss)
    grads = [p.grad for p in model.parameters()]
    precision.unscale(grads)
    return grads


def test_fp16_gradients_reach_the_optimizer_unscaled_and_in_fp32():
    """Scaled by 2^16 in the backward pass, divided by it before the optimizer: each tensor's
    gradient is fp32's within fp16 autocast's rounding (relative error measured at most 0.4%)."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny"))
    batch = torch.randint(0, model.config.vocab_size, (4, 32))
    reference = [g.clone() for g in gradients(model, batch, MixedPrecision("fp32", CPU))]
    fp16 = MixedPrecision("fp16", CPU)
    assert fp16.loss_scale == 2.0**16
    for expected, got in zip(reference, gradients(model, batch, fp16)):
        assert got.dtype == torch.float32
        assert (got - expected).norm() <= 0.01 * expected.norm()


def test_an_overflowing_micro_batch_halves_the_scale_and_a_run_without_overflow_doubles_it():
    fp16 = MixedPrecision("fp16", CPU, initial_scale=2.0**20)
    fp16.update(overflowed=True)
    assert (fp16.loss_scale, fp16.overflows) == (2.0**19, 1)
    for _ in range(MixedPrecision.GROWTH_INTERVAL - 1):
        fp16.update(overflowed=False)
    assert fp16.loss_scale == 2.0**19
    fp16.update(overflowed=False)
    assert fp16.loss_scale == 2.0**20
    fp32 = MixedPrecision("fp32", CPU)
    fp32.update(overflowed=True)
    assert (fp32.loss_scale, fp32.overflows) == (1.0, 0)


def test_a_peer_in_fp16_skips_the_micro_batches_that_overflow_and_goes_on(tmp_path, write_run_config, start_peer):
    """A peer in fp16 whose loss scale starts so high (2^30, peer.faults) that its first micro-batches
    overflow: each is skipped, not contributed, and halves the scale, until the gradients fit fp16's
    range; the peer then trains and contributes exactly the micro-batches that did not overflow."""
    run_toml = write_run_config(tmp_path, target_batch_size=16)
    peer = start_peer(
        "fp16", run_toml, max_epochs=2, batch_size=4, precision="fp16", faults=FaultPlan(initial_loss_scale=2.0**30)
    )
    summary = peer.wait(timeout=180)
    events = peer.events()

    assert summary["precision"] == "fp16"
    assert summary["fp16_overflows"] >= 1
    assert summary["samples_skipped"] == 4 * summary["fp16_overflows"]
    assert summary["epoch"] >= 2
    micro_batches = sum(e["micro_batches"] for e in events if e["event"] == "epoch")
    assert summary["samples_contributed"] == 4 * micro_batches > 0
    assert all(e["train_loss"] is None or e["train_loss"] < 20 for e in events if e["event"] == "epoch")
