"""starling-model prune: a student cut out of a parent's most important layers, channels and dimensions."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import model  # noqa: F401  (registers the "starling" architecture with transformers' Auto classes)
from coordinator.model_cli import main
from model import CausalLM, ModelConfig
from model.data import load_corpus
from model.prune import prune

SEQ_LEN = 32


def parent(**overrides) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset("tiny", num_hidden_layers=3, **overrides)).eval()


def calibration() -> torch.Tensor:
    return load_corpus(seq_len=SEQ_LEN).sequences[:16]


def logits(network: CausalLM, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.eval()(batch).logits


def test_pruned_to_the_parents_sizes_the_student_is_the_parent():
    teacher, batch = parent(), calibration()
    assert torch.equal(logits(prune(teacher, batch, 3, 128, 64), batch), logits(teacher, batch))


def test_dead_channels_and_a_block_that_changes_nothing_are_the_first_cut():
    """A parent whose blocks each have 32 MLP channels that never fire (their gate and up rows are
    zero) and whose middle block adds nothing to the residual stream (zero output projections):
    cut to 2 blocks of 96 channels, the student computes exactly what the parent does."""
    teacher, batch = parent(), calibration()
    with torch.no_grad():
        for block in teacher.layers:
            block.mlp.gate_up_proj.weight[[*range(0, 32), *range(128, 160)]] = 0
        teacher.layers[1].attn.o_proj.weight.zero_()
        teacher.layers[1].mlp.down_proj.weight.zero_()
    student = prune(teacher, batch, 2, 96, 64)
    torch.testing.assert_close(logits(student, batch), logits(teacher, batch), rtol=0, atol=1e-5)


def test_the_student_has_exactly_the_parameters_of_its_sizes(tmp_path, capsys):
    """Counted by hand for the tiny preset (4 query and 2 key-value heads of the parent's width 16,
    tied embeddings): embeddings, per block two norms, attention and the MLP, and the final norm."""
    parent().save_pretrained(tmp_path / "parent")
    arguments = ["--layers", "2", "--intermediate-size", "96", "--hidden-size", "48"]
    assert main(["prune", "--from", str(tmp_path / "parent"), *arguments, "--out", str(tmp_path / "student")]) == 0
    assert "of the parent's" in capsys.readouterr().out
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    vocab, layers, channels, hidden, heads, kv_heads, head_dim = 32000, 2, 96, 48, 4, 2, 16
    per_block = 2 * hidden + hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    per_block += hidden * 2 * channels + channels * hidden
    assert sum(p.numel() for p in student.parameters()) == vocab * hidden + layers * per_block + hidden
    assert (student.config.num_hidden_layers, student.config.intermediate_size, student.config.hidden_size) == (
        2,
        96,
        48,
    )


def test_a_student_pruned_from_a_trained_parent_starts_far_better_than_a_random_one():
    torch.manual_seed(0)
    teacher = CausalLM(ModelConfig.from_preset("tiny", num_hidden_layers=3))
    sequences = load_corpus(seq_len=SEQ_LEN).sequences
    train, held_out = sequences[:-64], sequences[-64:]
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    teacher.train()
    for step in range(30):  # held-out loss 10.36 -> 7.42; the student starts at 7.27, a random one at 10.36
        batch = train[step * 8 : (step + 1) * 8]
        teacher(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    student = prune(teacher.eval(), train[:32], 2, 64, 48)
    torch.manual_seed(1)
    random = CausalLM(student.config).eval()
    with torch.no_grad():
        teacher_loss, student_loss, random_loss = (
            m(held_out, labels=held_out).loss.item() for m in (teacher.eval(), student.eval(), random)
        )
    assert student_loss < random_loss - 1.0, (teacher_loss, student_loss, random_loss)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--layers", "4", "--intermediate-size", "96", "--hidden-size", "48"],
            "--layers 4 must be between 1 and the parent's 3",
        ),
        (["--layers", "2", "--intermediate-size", "256", "--hidden-size", "48"], "--intermediate-size 256 must be"),
        (["--layers", "2", "--intermediate-size", "96", "--hidden-size", "65"], "--hidden-size 65 must be"),
    ],
)
def test_a_target_larger_than_the_parent_is_one_line_and_exit_status_2(tmp_path, capsys, arguments, message):
    parent().save_pretrained(tmp_path / "parent")
    assert main(["prune", "--from", str(tmp_path / "parent"), *arguments, "--out", str(tmp_path / "student")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("starling-model: error: ") and message in line
    assert not (tmp_path / "student").exists()


def test_a_mixture_of_experts_parent_is_refused():
    teacher = parent(num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="pruning takes dense models"):
        prune(teacher, calibration(), 2, 64, 48)
