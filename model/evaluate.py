"""A model's loss on prepared sequences: every next token of text, the assistant's tokens of
conversations (model.chat), and its KL divergence from a teacher's distribution (distillation).
`starling-eval` (coordinator/eval_cli.py) runs it on a checkpoint."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from model.chat import CHAT_VOCAB, inputs_and_labels
from model.kernels import IGNORE_INDEX
from model.objectives import teacher_kl
from model.prepared import Manifest
from model.tokenizer import load_tokenizer
from model.transformer import CausalLM


def check_vocabulary(manifest: Manifest, vocab_size: int, where: str) -> None:
    """Raise ValueError unless the tokens of a prepared dataset fit a model's vocabulary."""
    data_vocabulary = CHAT_VOCAB if manifest.chat else load_tokenizer().vocab_size
    if data_vocabulary > vocab_size:
        raise ValueError(
            f"{where} was tokenised with a vocabulary of {data_vocabulary}, beyond the model's {vocab_size}"
        )


def evaluate(
    model: CausalLM, sequences: torch.Tensor, chat: bool, batch_size: int = 8, teacher: CausalLM | None = None
) -> dict:
    """The mean loss over every token that carries one, of prepared `sequences` (conversations when
    `chat`), with the counts behind it; with a `teacher`, also the mean KL(teacher || model) of
    their next-token distributions over the same tokens (temperature 1)."""
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the model's ({model.config.vocab_size})"
        )
    model.eval()
    if teacher is not None:
        teacher.eval()
    total, tokens, kl = 0.0, 0, 0.0
    with torch.no_grad():
        for start in tqdm(range(0, len(sequences), batch_size), desc="evaluating", unit="batch", disable=None):
            batch = sequences[start : start + batch_size]
            inputs, labels = inputs_and_labels(batch) if chat else (batch, batch)
            kept = labels[:, 1:] != IGNORE_INDEX
            counted = int(kept.sum())
            if not counted:
                continue
            output = model(inputs, labels=labels)
            total += output.loss.item() * counted
            tokens += counted
            if teacher is not None:
                kl += teacher_kl(output.logits[:, :-1][kept], teacher(inputs).logits[:, :-1][kept]).item()
    if not tokens:
        raise ValueError("no token of these sequences carries a loss")
    loss = total / tokens
    result = dict(loss=loss, perplexity=math.exp(loss), tokens=tokens, sequences=len(sequences))
    return result if teacher is None else {**result, "kl": kl / tokens}
