"""Mistral's v1 SentencePiece tokenizer (32,000 tokens), loaded offline from mistral-common's data."""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from pathlib import Path

import sentencepiece


class Tokenizer:
    """A thin wrapper over SentencePiece with Mistral's special ids (unk 0, bos 1, eos 2)."""

    def __init__(self, model_file: str | Path) -> None:
        self.model_file = Path(model_file)
        self.sha256 = hashlib.sha256(self.model_file.read_bytes()).hexdigest()  # names it in prepared datasets
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self._sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def mistral_v1_model_file() -> Path:
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


@functools.cache
def load_tokenizer() -> Tokenizer:
    """The Mistral 7B v1 tokenizer; no network access needed."""
    return Tokenizer(mistral_v1_model_file())
