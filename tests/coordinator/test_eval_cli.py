"""starling-eval: a checkpoint's loss on a prepared dataset of text or conversations; its errors."""

import json

import numpy as np
import pytest
import torch

from coordinator.data_cli import main as starling_data
from coordinator.eval_cli import main
from model import CausalLM, ModelConfig
from model.chat import CHAT_VOCAB, inputs_and_labels
from model.prepared import load_prepared
from model.tokenizer import load_tokenizer

SEQ_LEN = 32


def checkpoint(folder, vocab_size: int):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=vocab_size))
    model.save_pretrained(folder)
    return model.eval()


def evaluated(capsys, *arguments) -> dict:
    assert main(list(arguments)) == 0
    return json.loads(capsys.readouterr().out)


def test_the_loss_of_text_is_the_models_mean_over_every_next_token(tmp_path, capsys, write_prepared_text):
    """In batches of 3 (the last one short), weighted by their tokens: the model's own loss over
    all ten sequences at once."""
    model = checkpoint(tmp_path / "checkpoint", load_tokenizer().vocab_size)
    rows = write_prepared_text(tmp_path / "text", 10, SEQ_LEN)
    result = evaluated(
        capsys, "--checkpoint", str(tmp_path / "checkpoint"), "--data", str(tmp_path / "text"), "--batch-size", "3"
    )
    with torch.no_grad():
        expected = model(rows, labels=rows).loss.item()
    assert result["data"] == "text" and result["sequences"] == 10 and result["tokens"] == 10 * (SEQ_LEN - 1)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)


def test_the_loss_of_conversations_is_on_the_assistants_tokens(tmp_path, capsys, write_conversations):
    model = checkpoint(tmp_path / "checkpoint", CHAT_VOCAB)
    source = write_conversations(tmp_path / "chats.jsonl", 12)
    assert starling_data(["prepare-chat", str(source), "--out", str(tmp_path / "chats"), "--seq-len", "48"]) == 0
    capsys.readouterr()
    _, sequences = load_prepared(tmp_path / "chats")
    result = evaluated(capsys, "--checkpoint", str(tmp_path / "checkpoint"), "--data", str(tmp_path / "chats"))
    inputs, labels = inputs_and_labels(sequences)
    with torch.no_grad():
        expected = model(inputs, labels=labels).loss.item()
    assert result["data"] == "conversations" and result["tokens"] == int((labels[:, 1:] != -100).sum())
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_with_a_teacher_it_is_the_mean_kl_from_the_teacher_over_the_same_tokens(tmp_path, capsys, write_prepared_text):
    """Against itself a model is 0 nats from its teacher; against another, the mean over every
    next token of KL(teacher || model) of the two full distributions."""
    model = checkpoint(tmp_path / "student", load_tokenizer().vocab_size)
    torch.manual_seed(1)
    teacher = CausalLM(ModelConfig.from_preset("tiny", vocab_size=load_tokenizer().vocab_size, num_hidden_layers=3))
    teacher.save_pretrained(tmp_path / "teacher")
    rows = write_prepared_text(tmp_path / "text", 10, SEQ_LEN)
    common = ["--checkpoint", str(tmp_path / "student"), "--data", str(tmp_path / "text"), "--batch-size", "4"]
    assert evaluated(capsys, *common, "--teacher", str(tmp_path / "student"))["kl"] == pytest.approx(0, abs=1e-6)
    result = evaluated(capsys, *common, "--teacher", str(tmp_path / "teacher"))
    with torch.no_grad():
        vocab = model.config.vocab_size
        student_log = torch.log_softmax(model(rows).logits[:, :-1].reshape(-1, vocab), dim=-1)
        teacher_log = torch.log_softmax(teacher.eval()(rows).logits[:, :-1].reshape(-1, vocab), dim=-1)
    expected = (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean().item()
    assert result["tokens"] == 10 * (SEQ_LEN - 1) and result["kl"] == pytest.approx(expected, rel=1e-4)


def test_bad_input_is_one_line_naming_it_and_exit_status_2(tmp_path, capsys, write_conversations, write_prepared_text):
    checkpoint(tmp_path / "small", load_tokenizer().vocab_size)
    chat_model = tmp_path / "chat-model"
    checkpoint(chat_model, CHAT_VOCAB)
    write_prepared_text(tmp_path / "text", 10, SEQ_LEN)
    source = write_conversations(tmp_path / "chats.jsonl", 4)
    assert starling_data(["prepare-chat", str(source), "--out", str(tmp_path / "chats"), "--seq-len", "48"]) == 0
    capsys.readouterr()
    cases = [
        (
            ["--checkpoint", str(tmp_path / "nowhere"), "--data", str(tmp_path / "text")],
            "is not a transformers checkpoint",
        ),
        (["--checkpoint", str(tmp_path / "small"), "--data", str(tmp_path / "nowhere")], "cannot be read"),
        (
            ["--checkpoint", str(tmp_path / "small"), "--data", str(tmp_path / "chats")],
            "a vocabulary of 32768, beyond the model's 32000",
        ),
        (
            ["--checkpoint", str(tmp_path / "small"), "--data", str(tmp_path / "text"), "--teacher", str(chat_model)],
            "the teacher's vocabulary (32768) is not the model's (32000)",
        ),
    ]
    for arguments, message in cases:
        assert main(arguments) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("starling-eval: error: ") and message in line, line
