"""distillation_loss: the next-token loss and the softened KL to a teacher, mixed as configured."""

import pytest
import torch

from model.objectives import (
    bucketed_teacher_kl,
    distillation_loss,
    teacher_kl,
    teacher_top_k,
    top_k_distillation_loss,
)
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


def reference_bucketed_kl(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """KL of the (top-k + rest) buckets per row, in float64 from probabilities, written plainly."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    top = p.topk(k, -1).indices
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    if k == p.shape[-1]:
        return (p_top * torch.log(p_top / q_top)).sum(-1)
    p_rest, q_rest = (p * tail).sum(-1), (q * tail).sum(-1)
    rest = p_rest * torch.log(p_rest / q_rest)
    return (p_top * torch.log(p_top / q_top)).sum(-1) + rest


@pytest.mark.parametrize("k", [1, 5, VOCAB - 1, VOCAB])
def test_the_top_k_kl_misses_the_full_kl_by_exactly_the_teacher_s_tail_mass_times_the_tail_s_kl(k):
    """The bound stated in bucketed_teacher_kl, row by row: full = bucketed + p_rest x KL(tails) >= bucketed."""
    student, teacher, temperature = logits(6, (40, VOCAB)), logits(7, (40, VOCAB)), 1.5
    ids, log_probs = teacher_top_k(teacher, k, temperature)
    bucketed = torch.stack(
        [bucketed_teacher_kl(s[None], i[None], lp[None], temperature) for s, i, lp in zip(student, ids, log_probs)]
    )
    torch.testing.assert_close(
        bucketed.double(), reference_bucketed_kl(student, teacher, k, temperature), rtol=1e-4, atol=1e-5
    )
    full = torch.stack([teacher_kl(s[None], t[None], temperature) for s, t in zip(student, teacher)]).double()
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    p_rest = (p * tail).sum(-1)
    p_tail = torch.where(tail, p, 0) / p_rest.clamp_min(1e-300)[:, None]
    q_tail = torch.where(tail, q, 0) / (q * tail).sum(-1).clamp_min(1e-300)[:, None]
    tail_kl = torch.where(tail, p_tail * torch.log(p_tail / q_tail), 0).nan_to_num().sum(-1)
    torch.testing.assert_close(full - bucketed.double(), p_rest * tail_kl, rtol=1e-3, atol=2e-5)
    assert bool((bucketed.double() <= full + 2e-5).all())
    if k == VOCAB:
        torch.testing.assert_close(bucketed.double(), full, rtol=1e-5, atol=1e-5)
    if k <= VOCAB - 2:  # a tail of two tokens or more: the student's can be shaped unlike the teacher's
        assert float((full - bucketed.double()).max()) > 1e-3


def test_the_top_k_loss_and_its_gradient_match_the_reference_and_with_every_token_the_full_loss():
    labels = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(8))
    labels[1, 3] = -100
    teacher, temperature, weight = logits(9), 2.0, 0.7
    kept = labels[:, 1:] != -100
    for k in (4, VOCAB):
        ids, log_probs = teacher_top_k(teacher, k, temperature)
        student = logits(10).requires_grad_()
        top_k_distillation_loss(student, ids, log_probs, labels, temperature, weight).backward()
        reference = logits(10).double().requires_grad_()
        s, y = reference[:, :-1][kept], labels[:, 1:][kept]
        soft = reference_bucketed_kl(s, teacher[:, :-1][kept], k, temperature).mean()
        hard = torch.nn.functional.cross_entropy(s, y)
        (weight * temperature**2 * soft + (1 - weight) * hard).backward()
        torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-4, atol=1e-6)
    full = logits(10).requires_grad_()
    distillation_loss(full, teacher, labels, temperature, weight).backward()
    torch.testing.assert_close(student.grad, full.grad, rtol=1e-4, atol=1e-6)  # k = VOCAB: the full loss
