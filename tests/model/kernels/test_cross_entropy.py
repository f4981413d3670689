"""Fused linear + cross-entropy against its reference: loss, hidden and weight gradients."""

import pytest
import torch

from model import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(mode, hidden, weight, labels, ignore_index=kernels.IGNORE_INDEX, grad_scale=1.0):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = kernels.linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, mode=mode)
    (loss * grad_scale).backward()
    return loss, hidden.grad, weight.grad


def inputs(tokens, width, vocab, dtype, ignored=0):
    hidden = torch.randn(tokens, width, dtype=dtype)
    weight = (torch.randn(vocab, width) / width**0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,))
    labels[torch.randperm(tokens)[:ignored]] = kernels.IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens, width, vocab, ignored",
    [(1, 16, 50, 0), (37, 16, 300, 5), (70, 24, 1500, 3)],  # one token; several chunks; vocab over one tile
)
def test_matches_reference(tokens, width, vocab, ignored, dtype, assert_matches):
    torch.manual_seed(0)
    args = inputs(tokens, width, vocab, dtype, ignored)
    fused, reference = run("triton", *args, grad_scale=3.0), run("torch", *args, grad_scale=3.0)
    assert fused[0].dtype == reference[0].dtype == torch.float32
    for a, b in zip(fused, reference):
        assert_matches(a, b, dtype)


def test_custom_ignore_index_and_frozen_weight(assert_matches):
    torch.manual_seed(0)
    hidden, weight, labels = inputs(20, 8, 40, torch.float32)
    labels[::3] = 7  # ignored below, although a valid class
    h = hidden.clone().requires_grad_()
    loss = kernels.linear_cross_entropy(h, weight, labels, ignore_index=7, mode="triton")
    loss.backward()
    expected = run("torch", hidden, weight, labels, ignore_index=7)
    assert_matches(loss, expected[0], torch.float32)
    assert_matches(h.grad, expected[1], torch.float32)


def test_all_ignored_gives_nan_loss_and_zero_gradients_like_torch():
    hidden, weight, labels = inputs(6, 8, 10, torch.float32)
    labels[:] = kernels.IGNORE_INDEX
    fused, reference = run("triton", hidden, weight, labels), run("torch", hidden, weight, labels)
    assert fused[0].isnan() and reference[0].isnan()
    for a, b in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(a, b)


def test_out_of_range_label_raises():
    hidden, weight, labels = inputs(4, 8, 10, torch.float32)
    labels[1] = 10
    with pytest.raises(RuntimeError, match="outside"):
        kernels.linear_cross_entropy(hidden, weight, labels, mode="triton")
