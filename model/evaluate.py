"""A model's loss on prepared sequences: every next token of text, the assistant's tokens of
conversations (model.chat). `starling-eval` (coordinator/eval_cli.py) runs it on a checkpoint."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from model.chat import CHAT_VOCAB, inputs_and_labels
from model.kernels import IGNORE_INDEX
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


def evaluate(model: CausalLM, sequences: torch.Tensor, chat: bool, batch_size: int = 8) -> dict:
    """The mean loss over every token that carries one, of prepared `sequences` (conversations when
    `chat`), with the counts behind it."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(sequences), batch_size), desc="evaluating", unit="batch", disable=None):
            batch = sequences[start : start + batch_size]
            inputs, labels = inputs_and_labels(batch) if chat else (batch, batch)
            counted = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if counted:
                total += model(inputs, labels=labels).loss.item() * counted
                tokens += counted
    if not tokens:
        raise ValueError("no token of these sequences carries a loss")
    loss = total / tokens
    return dict(loss=loss, perplexity=math.exp(loss), tokens=tokens, sequences=len(sequences))
