"""The whole model with kernels="triton" (interpreted) against kernels="torch": same loss,
gradients and 20-step loss curve (the convergence check of Liger-Kernel's test suite)."""

import torch
from tiny_model import STEPS, batch, build

from model import CausalLM


def test_same_loss_and_gradients():
    reference = build("torch")
    fused = build("triton", reference.state_dict())
    ids, labels = batch(0)
    outputs = {}
    for name, model in (("torch", reference), ("triton", fused)):
        out = model(ids, labels=labels)
        assert out.logits is None  # training with labels goes through the fused head and loss
        out.loss.backward()
        outputs[name] = out.loss
    torch.testing.assert_close(outputs["triton"], outputs["torch"], atol=1e-5, rtol=1e-5)
    reference_grads = dict(reference.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, reference_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def train(model: CausalLM) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        ids, labels = batch(step % 4)
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_same_loss_curve():
    reference = build("torch")
    fused = build("triton", reference.state_dict())
    expected, actual = train(reference), train(fused)
    assert expected[-1] < expected[0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), atol=1e-4, rtol=1e-4)
