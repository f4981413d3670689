"""distillation_loss: the next-token loss and the softened KL to a teacher, mixed as configured."""

import pytest
import torch

from model.objectives import distillation_loss
from tests.model.test_transformer import tiny

VOCAB = 37  # odd, like the shapes the kernels are tested on


def logits(seed: int, shape=(3, 11, VOCAB)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_the_mix_is_the_formula_term_by_term():
    student, teacher = logits(0), logits(1)
    labels = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    labels[0, 4] = labels[2, 10] = -100  # ignored as targets
    temperature, weight = 2.5, 0.3
    kept = labels[:, 1:] != -100
    s, t, y = student[:, :-1][kept], teacher[:, :-1][kept], labels[:, 1:][kept]
    hard = -torch.log_softmax(s, -1).gather(1, y[:, None]).mean()
    p = torch.softmax(t / temperature, -1)
    soft = (p * (torch.log(p) - torch.log_softmax(s / temperature, -1))).sum(-1).mean()
    expected = weight * temperature**2 * soft + (1 - weight) * hard
    torch.testing.assert_close(distillation_loss(student, teacher, labels, temperature, weight), expected)


def test_without_the_kl_term_it_is_the_model_s_own_loss():
    torch.manual_seed(0)
    model = tiny()
    batch = torch.randint(0, model.config.vocab_size, (2, 16))
    own = model(batch, labels=batch).loss
    mixed = distillation_loss(model(batch).logits, logits(3, (2, 16, model.config.vocab_size)), batch, 2.0, 0.0)
    torch.testing.assert_close(mixed, own, rtol=1e-5, atol=1e-5)


def test_a_student_equal_to_its_teacher_has_no_kl_and_only_the_student_gets_gradients():
    student = logits(4).requires_grad_()
    teacher = student.detach().clone()
    labels = torch.randint(0, VOCAB, (3, 11))
    loss = distillation_loss(student, teacher, labels, 3.0, 1.0)
    assert abs(float(loss)) < 1e-5
    distillation_loss(student, logits(5), labels, 3.0, 1.0).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_a_teacher_of_another_vocabulary_is_named():
    with pytest.raises(ValueError, match="share the student's vocabulary"):
        distillation_loss(logits(0), logits(1, (3, 11, VOCAB + 1)), torch.zeros(3, 11, dtype=torch.long), 1.0, 0.5)
