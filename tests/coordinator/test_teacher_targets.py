"""starling-data teacher-targets: a teacher's top-k log-probs stored after each sequence of a prepared
text dataset, exactly what the teacher gives; its errors."""

import pytest
import torch

from coordinator.data_cli import main
from model import CausalLM, ModelConfig
from model.objectives import teacher_top_k
from model.prepared import load_manifest, load_prepared, manifest_digest, sha256_of, split_teacher_targets

SEQUENCES, SEQ_LEN, TOP_K = 10, 32, 5


@pytest.fixture
def teacher(tmp_path):
    torch.manual_seed(3)
    CausalLM(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_every_position_carries_the_teacher_s_top_k_and_the_tokens_are_kept(
    tmp_path, teacher, write_prepared_text, capsys
):
    tokens = write_prepared_text(tmp_path / "text", SEQUENCES, SEQ_LEN)
    out = tmp_path / "targets"
    arguments = ["teacher-targets", str(tmp_path / "text"), "--teacher", str(teacher), "--out", str(out)]
    assert main([*arguments, "--top-k", str(TOP_K), "--temperature", "1.5"]) == 0
    printed = capsys.readouterr().out
    digest = sha256_of(teacher / "model.safetensors")
    assert f'dataset = "{manifest_digest(out)}"' in printed and f'teacher_sha256 = "{digest}"' in printed

    manifest = load_manifest(out)
    assert manifest.teacher_targets == {
        "teacher_sha256": digest,
        "top_k": TOP_K,
        "temperature": 1.5,
        "vocab_size": 32000,
    }
    assert manifest.steps == load_manifest(tmp_path / "text").steps and manifest.sequences == SEQUENCES
    _, tokens_only = load_prepared(out)  # without the targets, the dataset reads as the one it came from
    assert torch.equal(tokens_only, tokens)
    _, rows = load_prepared(out, with_teacher_targets=True)
    stored_tokens, ids, log_probs = split_teacher_targets(rows, SEQ_LEN, TOP_K)
    with torch.no_grad():
        expected_ids, expected_log_probs = teacher_top_k(CausalLM.from_pretrained(teacher)(tokens).logits, TOP_K, 1.5)
    assert torch.equal(stored_tokens, tokens) and torch.equal(ids, expected_ids)
    torch.testing.assert_close(log_probs, expected_log_probs, rtol=0, atol=1e-5)  # float32 stored bit for bit


@pytest.mark.parametrize(
    "case, culprit",
    [
        ("top-k", "--top-k 40000: the teacher's vocabulary has 32000 tokens"),
        ("no teacher", "--teacher: "),
        ("twice", "already carries teacher targets"),
        ("chat", "holds conversations"),
    ],
)
def test_bad_input_is_one_line_naming_it(tmp_path, teacher, write_prepared_text, capsys, case, culprit):
    data = tmp_path / "text"
    write_prepared_text(data, 4, SEQ_LEN)
    arguments = ["teacher-targets", str(data), "--teacher", str(teacher), "--out", str(tmp_path / "out")]
    if case == "top-k":
        arguments += ["--top-k", "40000"]
    elif case == "no teacher":
        arguments[3] = str(tmp_path / "nowhere")
    elif case == "twice":
        assert main([*arguments[:-1], str(tmp_path / "first")]) == 0
        arguments[1] = str(tmp_path / "first")
    elif case == "chat":
        manifest = (data / "manifest.json").read_text().replace('"chat": false', '"chat": true')
        (data / "manifest.json").write_text(manifest)
    capsys.readouterr()
    assert main(arguments) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("starling-data: error:")]
    assert culprit in line, line
    assert not (tmp_path / "out" / "manifest.json").exists()
