"""Training objectives beyond the next-token loss: distillation from a teacher's distribution, either
the teacher's whole distribution (its logits, computed beside the student) or its top-k log-probs,
precomputed into the data (starling-data teacher-targets)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from model.adapters import load_checkpoint
from model.kernels import IGNORE_INDEX
from model.prepared import sha256_of
from model.transformer import CausalLM

TEACHER_WEIGHTS = "model.safetensors"  # the file whose SHA-256 names a teacher (objective.teacher_sha256)


def load_teacher(folder: str | os.PathLike, sha256: str | None = None) -> tuple[CausalLM, str]:
    """A teacher from a Starling or transformers checkpoint folder, frozen in eval mode, and the
    SHA-256 of its weights file; ValueError naming the file when it is missing or, given `sha256`,
    not that teacher."""
    weights = Path(folder) / TEACHER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{weights} is missing")
    digest = sha256_of(weights)
    if sha256 is not None and digest != sha256:
        raise ValueError(f"{weights} is not the run's teacher (SHA-256 {digest[:16]}..., the run's {sha256[:16]}...)")
    return load_checkpoint(folder).eval().requires_grad_(False), digest


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
    student, targets, kept = _predicting(student_logits, labels)
    teacher = _kept_rows(teacher_logits, kept)
    return _mixed(student, targets, teacher_kl(student, teacher, temperature), temperature, kl_weight)


def top_k_distillation_loss(
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_log_probs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kl_weight: float,
) -> torch.Tensor:
    """distillation_loss with the teacher known by its top-k tokens and their log-probs at
    temperature T ([batch, seq, k] each, from teacher_top_k): the KL term is bucketed_teacher_kl."""
    student, targets, kept = _predicting(student_logits, labels)
    ids, log_probs = _kept_rows(top_ids, kept), _kept_rows(top_log_probs, kept)
    return _mixed(student, targets, bucketed_teacher_kl(student, ids, log_probs, temperature), temperature, kl_weight)


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The sum over rows of KL(teacher || student) of the distributions of [rows, vocab] logits
    softened by `temperature`, in float32."""
    return F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        log_target=True,
        reduction="sum",
    )


def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each position and their log-probs at `temperature` (float32),
    most likely first: what starling-data teacher-targets stores of a teacher."""
    log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top = log_probs.topk(k, dim=-1)
    return top.indices, top.values


def bucketed_teacher_kl(
    student_logits: torch.Tensor, top_ids: torch.Tensor, top_log_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The sum over rows of KL(teacher || student) with each distribution reduced to k + 1 buckets:
    the teacher's top-k tokens ([rows, k] ids and log-probs at T), and the rest of the vocabulary as
    one bucket. By the chain rule of KL, the full KL is this plus p_rest x KL(p_tail || q_tail): the
    teacher's mass outside its top-k times the KL of the two distributions within that tail. So it
    never exceeds the full KL, and misses it by exactly p_rest times the tail's KL (zero when k is
    the vocabulary)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    student_top = student.gather(-1, top_ids)
    teacher_top = top_log_probs.float()
    top = (teacher_top.exp() * (teacher_top - student_top)).sum()
    if top_ids.shape[-1] == student.shape[-1]:
        return top  # every token is in the top-k: there is no rest bucket
    # The rest bucket: the student's from its logits outside the top-k (exact even when its top mass
    # rounds to 1), the teacher's by subtraction.
    student_rest = torch.logsumexp(student.scatter(-1, top_ids, float("-inf")), dim=-1)
    teacher_rest = (1 - teacher_top.exp().sum(-1)).clamp_min(0)
    rest = (torch.xlogy(teacher_rest, teacher_rest) - teacher_rest * student_rest).sum()
    return top + rest


def _predicting(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 [rows, vocab] logits of the positions that predict a label, their targets, and
    the mask of those positions among all [batch x (seq - 1)]."""
    targets = labels[:, 1:].reshape(-1)
    kept = targets != IGNORE_INDEX
    return _kept_rows(logits, kept).float(), targets[kept], kept


def _kept_rows(per_position: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[batch, seq, n] values of the positions predicting a kept label, as [rows, n]."""
    return per_position[:, :-1].reshape(-1, per_position.shape[-1])[kept]


def _mixed(
    student: torch.Tensor, targets: torch.Tensor, kl_sum: torch.Tensor, temperature: float, kl_weight: float
) -> torch.Tensor:
    hard = F.cross_entropy(student, targets)
    return kl_weight * temperature**2 * kl_sum / len(student) + (1 - kl_weight) * hard
