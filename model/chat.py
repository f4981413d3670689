"""Conversations for supervised fine-tuning, rendered with Mistral's own instruct template.

mistral-common renders a conversation (system, user, assistant and tool messages, tool calls and
the tools on offer) with the v3 instruct tokenizer of Mistral 7B v0.3, which it ships: nothing is
downloaded. The loss falls on the assistant's tokens only: each reply, tool calls included, through
the end-of-sequence token that closes it.

A prepared SFT sequence is one conversation, cut after an assistant turn so that no template
marker is split, and padded to the sequence length. It is stored as one integer per token: the
token's id, plus CHAT_VOCAB when the token carries no loss (the template, the other roles' messages,
the padding). SFT data thus goes through the same shard files, manifests, digests and downloads as
pretraining corpora (model.prepared), and `inputs_and_labels` turns a batch back into model inputs
and labels.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from model.kernels import IGNORE_INDEX

CHAT_TOKENIZER_FILE = "mistral_instruct_tokenizer_240323.model.v3"  # Mistral 7B v0.3's, in mistral-common
CHAT_VOCAB = 32768  # its vocabulary: a model fine-tuned on chat data needs at least this many embeddings
ROLES = ("system", "user", "assistant", "tool")
# Control tokens of the v3 template: a reply follows the end of an instruction or of tool results,
# unless another block opens there.
_CLOSERS = ("[/INST]", "[/TOOL_RESULTS]")
_OPENERS = ("[INST]", "[TOOL_RESULTS]", "[AVAILABLE_TOOLS]")


class ChatError(ValueError):
    """A conversation that cannot be rendered: the message names it and what is wrong."""


@dataclass(frozen=True)
class RenderedChat:
    tokens: list[int]
    trained: list[bool]  # per token: whether the assistant wrote it (and so carries the loss)


def chat_tokenizer_file() -> Path:
    return Path(str(importlib.resources.files("mistral_common") / "data" / CHAT_TOKENIZER_FILE))


@functools.cache
def chat_tokenizer_sha256() -> str:
    """Names the chat tokenizer in the manifests of prepared conversations."""
    return hashlib.sha256(chat_tokenizer_file().read_bytes()).hexdigest()


@functools.cache
def chat_tokenizer() -> MistralTokenizer:
    """The v3 instruct tokenizer, validating conversations for fine-tuning (the last message is the
    assistant's)."""
    tokenizer = MistralTokenizer.from_file(chat_tokenizer_file(), mode=ValidationMode.finetuning)
    assert tokenizer.instruct_tokenizer.tokenizer.n_words == CHAT_VOCAB
    return tokenizer


def parse_conversation(record: Any, where: str) -> ChatCompletionRequest:
    """A conversation from one JSON record: {"messages": [{"role": ..., "content": ...}, ...],
    "tools": [...] (optional)}, as OpenAI's and Mistral's chat APIs write them."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: no 'messages' list")
    for number, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ChatError(f"{where}: message {number} has role {role!r}; the roles are {', '.join(ROLES)}")
    try:
        return ChatCompletionRequest(messages=messages, tools=record.get("tools"))
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        place = ".".join(str(part) for part in first["loc"][:3])
        raise ChatError(f"{where}: {place}: {first['msg']}") from None


def render(conversation: ChatCompletionRequest, where: str) -> RenderedChat:
    """The conversation's tokens in Mistral's template, each marked with whether it carries the loss."""
    try:
        tokens = chat_tokenizer().encode_chat_completion(conversation).tokens
    except MistralCommonException as error:
        raise ChatError(f"{where}: {error}") from None
    return RenderedChat(tokens, assistant_tokens(tokens))


def assistant_tokens(tokens: list[int]) -> list[bool]:
    """Which tokens of a rendered conversation the assistant wrote: from the end of each
    instruction or tool results that a reply follows, through the end-of-sequence that closes it."""
    tokenizer = chat_tokenizer().instruct_tokenizer.tokenizer
    closers = {tokenizer.get_special_token(name) for name in _CLOSERS}
    openers = {tokenizer.get_special_token(name) for name in _OPENERS} | {tokenizer.bos_id}
    trained, replying = [], False
    for index, token in enumerate(tokens):
        trained.append(replying)
        if replying:
            replying = token != tokenizer.eos_id
        elif token in closers and index + 1 < len(tokens) and tokens[index + 1] not in openers:
            replying = True
    return trained


def sequence_of(chat: RenderedChat, seq_len: int) -> np.ndarray | None:
    """The stored sequence of a conversation: cut after the last assistant turn that fits in
    seq_len, padded with loss-free end-of-sequence tokens; None when not even its first turn fits."""
    eos = chat_tokenizer().instruct_tokenizer.tokenizer.eos_id
    ends = [i + 1 for i, token in enumerate(chat.tokens[:seq_len]) if token == eos and chat.trained[i]]
    if not ends:
        return None
    tokens = np.asarray(chat.tokens[: ends[-1]], dtype=np.int64)
    loss_free = ~np.asarray(chat.trained[: ends[-1]], dtype=bool)
    row = np.full(seq_len, eos + CHAT_VOCAB, dtype=np.int64)
    row[: len(tokens)] = tokens + CHAT_VOCAB * loss_free
    return row


def inputs_and_labels(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of stored SFT sequences as model inputs and labels (IGNORE_INDEX where no loss)."""
    loss_free = batch >= CHAT_VOCAB
    inputs = batch - CHAT_VOCAB * loss_free
    return inputs, inputs.masked_fill(loss_free, IGNORE_INDEX)
