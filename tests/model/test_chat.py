"""Conversations rendered for fine-tuning: Mistral's template, the loss on the assistant's tokens only."""

import json

import pytest
import torch
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from model.chat import (
    CHAT_VOCAB,
    ChatError,
    chat_tokenizer,
    inputs_and_labels,
    parse_conversation,
    render,
    sequence_of,
)
from model.kernels import IGNORE_INDEX

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Today's weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Answer in a few words."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And the weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "call00001", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call00001", "name": "get_weather"},
        {"role": "assistant", "content": "Sunny and 21 C."},
    ],
    "tools": [WEATHER_TOOL],
}


def spans(tokens: list[int], trained: list[bool]) -> list[list[int]]:
    """The runs of consecutive trained tokens."""
    runs, run = [], []
    for token, flag in zip(tokens, trained):
        if flag:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return runs + [run] * bool(run)


def decode(tokens: list[int]) -> str:
    """Their text, without the template's control tokens."""
    return chat_tokenizer().instruct_tokenizer.tokenizer.decode(tokens, special_token_policy=SpecialTokenPolicy.IGNORE)


def test_exactly_the_assistant_tokens_carry_the_loss():
    """The trained tokens are, in order, each assistant message as mistral-common encodes it alone
    (its reply or tool calls, through the end-of-sequence token): nothing of the system prompt,
    the user's turns, the tools on offer or the tool results."""
    request = parse_conversation(CONVERSATION, "test")
    chat = render(request, "test")
    assert chat.tokens == chat_tokenizer().encode_chat_completion(request).tokens
    instruct = chat_tokenizer().instruct_tokenizer
    last_user = max(i for i, message in enumerate(request.messages) if message.role == "user")
    expected = [
        instruct.encode_assistant_message(message, index < last_user)
        for index, message in enumerate(request.messages)
        if message.role == "assistant"
    ]
    assert spans(chat.tokens, chat.trained) == expected
    untrained = decode([t for t, flag in zip(chat.tokens, chat.trained) if not flag])
    for text in ("Answer in a few words.", "What is 2 + 2?", "And the weather in Paris?", "sunny, 21 C"):
        assert text in untrained


def test_a_tool_call_survives_rendering():
    chat = render(parse_conversation(CONVERSATION, "test"), "test")
    tokenizer = chat_tokenizer().instruct_tokenizer.tokenizer
    call = spans(chat.tokens, chat.trained)[1]
    assert call[0] == tokenizer.get_special_token("[TOOL_CALLS]") and call[-1] == tokenizer.eos_id
    (parsed,) = json.loads(decode(call[1:-1]))
    assert parsed == {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}


def test_a_stored_sequence_gives_back_the_template_and_the_labels():
    """Stored, then turned into inputs and labels: the inputs are the rendered tokens (then
    padding), and the labels are the assistant's tokens, IGNORE_INDEX elsewhere."""
    chat = render(parse_conversation(CONVERSATION, "test"), "test")
    seq_len = len(chat.tokens) + 5
    inputs, labels = inputs_and_labels(torch.from_numpy(sequence_of(chat, seq_len))[None])
    n = len(chat.tokens)
    assert inputs[0, :n].tolist() == chat.tokens
    expected = [token if flag else IGNORE_INDEX for token, flag in zip(chat.tokens, chat.trained)]
    assert labels[0, :n].tolist() == expected
    assert (labels[0, n:] == IGNORE_INDEX).all() and (inputs[0, n:] < CHAT_VOCAB).all()


@pytest.mark.parametrize("cut", [0, 3])
def test_a_long_conversation_is_cut_after_an_assistant_turn(cut):
    """A sequence too short for the whole conversation ends after the last assistant turn that
    fits (never inside a template marker or a reply); one too short for the first turn is none."""
    chat = render(parse_conversation(CONVERSATION, "test"), "test")
    eos = chat_tokenizer().instruct_tokenizer.tokenizer.eos_id
    turn_ends = [i + 1 for i, (t, flag) in enumerate(zip(chat.tokens, chat.trained)) if t == eos and flag]
    seq_len = turn_ends[1] + cut  # the second turn (the tool call) fits, the third does not
    inputs, labels = inputs_and_labels(torch.from_numpy(sequence_of(chat, seq_len))[None])
    assert inputs[0, : turn_ends[1]].tolist() == chat.tokens[: turn_ends[1]]
    assert (labels[0, turn_ends[1] :] == IGNORE_INDEX).all()
    assert sequence_of(chat, turn_ends[0] - 1) is None


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "message 1 has role 'robot'"),
        ({"messages": []}, "no 'messages' list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "Expected last role Assistant"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "messages.0"),
    ],
)
def test_a_conversation_that_does_not_fit_the_template_is_a_one_line_error(record, message):
    with pytest.raises(ChatError) as raised:
        render(parse_conversation(record, "chats.jsonl:7"), "chats.jsonl:7")
    text = str(raised.value)
    assert text.startswith("chats.jsonl:7: ") and message in text and "\n" not in text
