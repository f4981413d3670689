"""Checked kernels (model.kernels.guard): right ones are kept, failing or wrong ones replaced by
their reference with a warning, and the model's gradients stay the reference path's."""

import logging

import pytest
import torch
from tiny_model import batch, build

from model import kernels
from model.kernels import guard


@pytest.fixture(autouse=True)
def fresh_guard():
    """Each test starts with nothing checked and no faults, and leaves it so."""
    guard.declare_faults(guard.KernelFaults())
    yield
    guard.declare_faults(guard.KernelFaults())


def fused(y: torch.Tensor) -> bool:
    return "_RMSNorm" in y.grad_fn.name()


def rms_norm(shape=(5, 40)) -> torch.Tensor:
    x = torch.randn(shape, requires_grad=True)
    return kernels.rms_norm(x, torch.ones(shape[-1]), 1e-6, mode="checked")


def test_a_kernel_that_agrees_with_its_reference_is_kept():
    assert fused(rms_norm()) and fused(rms_norm((3, 2, 40))) and fused(rms_norm((9, 33)))
    assert guard.fallbacks() == {}


@pytest.mark.parametrize("fault", ["failing", "wrong"])
def test_a_failing_or_wrong_kernel_falls_back_to_its_reference_for_good(fault, caplog):
    guard.declare_faults(guard.KernelFaults(**{fault: frozenset({"rms_norm"})}))
    with caplog.at_level(logging.WARNING, logger="starling.model"):
        first = rms_norm()
    assert not fused(first) and not fused(rms_norm((9, 33)))
    (reason,) = guard.fallbacks().values()
    assert list(guard.fallbacks()) == ["rms_norm on cpu"]
    assert reason.startswith("failed (RuntimeError" if fault == "failing" else "its output differs")
    assert [record.getMessage() for record in caplog.records] == [
        f"kernel rms_norm on cpu: {reason}; using its PyTorch reference from now on"
    ]
    assert fused(kernels.rms_norm(torch.randn(2, 8, requires_grad=True), torch.ones(8), 1e-6, mode="triton"))


@pytest.mark.parametrize("fault", ["failing", "wrong"])
def test_the_model_with_faulty_kernels_has_the_reference_paths_gradients(fault):
    """Every kernel of the model's forward and backward declared failing or wrong: the checked
    model's loss and gradients are those of kernels="torch"."""
    names = frozenset({"rms_norm", "swiglu", "rotary", "linear_cross_entropy"})
    guard.declare_faults(guard.KernelFaults(**{fault: names}))
    reference = build("torch")
    checked = build("checked", reference.state_dict())
    ids, labels = batch(0)
    for model in (reference, checked):
        model(ids, labels=labels).loss.backward()
    assert {kernel.split(" on ")[0] for kernel in guard.fallbacks()} == names
    reference_grads = dict(reference.named_parameters())
    for name, param in checked.named_parameters():
        torch.testing.assert_close(param.grad, reference_grads[name].grad, atol=0, rtol=0, msg=name)


def test_the_checked_model_without_faults_takes_every_kernel():
    reference = build("torch")
    checked = build("checked", reference.state_dict())
    ids, labels = batch(0)
    losses = [model(ids, labels=labels).loss for model in (reference, checked)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert guard.fallbacks() == {}


def test_the_codec_kernels_are_checked_too():
    x = torch.randn(3000)
    packed = kernels.quantize_blockwise(x, mode="checked")
    torch.testing.assert_close(kernels.dequantize_blockwise(packed, 3000, mode="checked"), x, atol=0.05, rtol=0)
    guard.declare_faults(guard.KernelFaults(wrong=frozenset({"dequantize_blockwise"})))
    kernels.dequantize_blockwise(packed, 3000, mode="checked")
    assert list(guard.fallbacks()) == ["dequantize_blockwise on cpu"]
