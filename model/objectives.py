"""Training objectives beyond the next-token loss: distillation from a teacher's distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels import IGNORE_INDEX


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kl_weight: float,
) -> torch.Tensor:
    """kl_weight x T^2 x KL(teacher || student), both softened by temperature T, plus (1 - kl_weight)
    x the next-token loss (Hinton et al.: T^2 keeps the soft term's gradients on the hard term's
    scale as T changes). Logits: [batch, seq, vocab], position i predicting token i + 1 of labels
    [batch, seq]; positions whose next label is IGNORE_INDEX count in neither term. Computed in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"the teacher's logits {tuple(teacher_logits.shape)} do not match the student's "
            f"{tuple(student_logits.shape)}: a teacher must share the student's vocabulary"
        )
    vocab = student_logits.shape[-1]
    student = student_logits[:, :-1].reshape(-1, vocab).float()
    teacher = teacher_logits[:, :-1].reshape(-1, vocab).float()
    targets = labels[:, 1:].reshape(-1)
    kept = targets != IGNORE_INDEX
    student, teacher, targets = student[kept], teacher[kept], targets[kept]
    hard = F.cross_entropy(student, targets)
    soft = teacher_kl(student, teacher, temperature) / len(student)
    return kl_weight * temperature**2 * soft + (1 - kl_weight) * hard


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The sum over rows of KL(teacher || student) of the distributions of [rows, vocab] logits
    softened by `temperature`, in float32."""
    return F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        log_target=True,
        reduction="sum",
    )
