"""starling-data prepare-chat: conversations rendered, deduplicated, cut and sharded; its errors."""

import json

import pytest

from coordinator.data_cli import main
from model.chat import inputs_and_labels, parse_conversation, render
from model.data import load_corpus
from model.kernels import IGNORE_INDEX
from model.prepared import load_manifest, load_prepared

SEQ_LEN = 48


def test_conversations_become_one_sequence_each_with_the_loss_on_the_assistant(tmp_path, write_conversations, capsys):
    source = write_conversations(tmp_path / "chats.jsonl", 40)
    lines = source.read_text().splitlines()
    source.write_text("\n".join([*lines, lines[0], ""]))  # one exact duplicate
    assert main(["prepare-chat", str(source), "--out", str(tmp_path / "a"), "--seq-len", str(SEQ_LEN)]) == 0
    printed = capsys.readouterr().out
    assert 'kind = "sft"' in printed and f"seq_len = {SEQ_LEN}" in printed
    assert main(["prepare-chat", str(source), "--out", str(tmp_path / "b"), "--seq-len", str(SEQ_LEN)]) == 0

    manifest, sequences = load_prepared(tmp_path / "a")
    distinct = list(dict.fromkeys(lines))  # the synthetic set repeats some questions too
    assert manifest.chat and manifest.documents == len(distinct) == len(sequences)
    assert [step["removed"] for step in manifest.steps] == [{"exact": 41 - len(distinct)}, {"too_long": 0}]
    for shard in manifest.shards:  # preparing twice gives the same bytes
        assert (tmp_path / "a" / shard.file).read_bytes() == (tmp_path / "b" / shard.file).read_bytes()
    inputs, labels = inputs_and_labels(sequences)
    for index, line in enumerate(distinct):
        chat = render(parse_conversation(json.loads(line), "test"), "test")
        n = len(chat.tokens)
        assert inputs[index, :n].tolist() == chat.tokens
        assert labels[index, :n].tolist() == [t if flag else IGNORE_INDEX for t, flag in zip(chat.tokens, chat.trained)]
        assert (labels[index, n:] == IGNORE_INDEX).all()


def test_a_pretraining_run_refuses_conversations_and_a_fine_tuning_run_refuses_text(tmp_path, write_conversations):
    source = write_conversations(tmp_path / "chats.jsonl", 8)
    assert main(["prepare-chat", str(source), "--out", str(tmp_path / "chats"), "--seq-len", "48"]) == 0
    with pytest.raises(ValueError, match="holds conversations; this run trains on text"):
        load_corpus(tmp_path / "chats", seq_len=48)
    assert len(load_corpus(tmp_path / "chats", seq_len=48, chat=True)) == load_manifest(tmp_path / "chats").documents
    with pytest.raises(ValueError, match="not a folder of conversations prepared with starling-data prepare-chat"):
        load_corpus(None, seq_len=48, chat=True)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "role 'robot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "Expected last role Assistant"),
        ("{not json", "not JSON"),
    ],
)
def test_a_bad_conversation_is_one_line_naming_its_line_and_exit_status_2(tmp_path, capsys, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    (tmp_path / "chats.jsonl").write_text(f"{good}\n{line}\n")
    assert main(["prepare-chat", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "out")]) == 2
    (printed,) = capsys.readouterr().err.strip().splitlines()
    assert printed.startswith(f"starling-data: error: {tmp_path / 'chats.jsonl'}:2: ") and message in printed
    assert not (tmp_path / "out").exists()


def test_conversations_whose_first_turn_does_not_fit_are_counted_and_dropped(tmp_path, write_conversations):
    source = write_conversations(tmp_path / "chats.jsonl", 10)
    long = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    source.write_text(source.read_text() + json.dumps(long) + "\n")
    assert main(["prepare-chat", str(source), "--out", str(tmp_path / "out"), "--seq-len", "48"]) == 0
    manifest = load_manifest(tmp_path / "out")
    kept = manifest.steps[0]["documents_out"]
    assert manifest.documents == kept - 1 and manifest.steps[1]["removed"] == {"too_long": 1}
