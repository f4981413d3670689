"""Distillation ([objective] kind = "distill"): a peer runs the run's teacher beside its model, checks
that its copy is the run's, and learns the teacher's distribution."""

import subprocess
import sys
from pathlib import Path

import torch

from model import CausalLM, ModelConfig
from model.data import load_corpus
from model.objectives import distillation_loss
from model.prepared import sha256_of
from peer.run_config import RunConfig

EPOCHS = 16


def save_teacher(folder: Path) -> str:
    """A random tiny model made confident (its last norm scaled up): a distribution far from the
    data's, which training on the data alone does not approach. Returns its weights' SHA-256."""
    torch.manual_seed(1)
    teacher = CausalLM(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        teacher.norm.weight.mul_(20)
    teacher.save_pretrained(folder)
    return sha256_of(folder / "model.safetensors")


def with_objective(run_toml: Path, teacher: Path, sha256: str) -> Path:
    run_toml.write_text(
        run_toml.read_text()
        + f'[objective]\nkind = "distill"\nteacher = "{teacher}"\nteacher_sha256 = "{sha256}"\n'
        + "temperature = 1.0\nkl_weight = 1.0\n"
    )
    return run_toml


def held_out_kl(run: RunConfig, params: dict, teacher: Path) -> float:
    """KL(teacher || student) per token on text kept out of training."""
    student = CausalLM(run.model_config()).eval()
    student.load_state_dict(params, strict=False)
    reference = CausalLM.from_pretrained(teacher).eval()
    batch = load_corpus(seq_len=run.data.seq_len, seed=123).sequences[-64:]
    with torch.no_grad():
        return float(distillation_loss(student(batch).logits, reference(batch).logits, batch, 1.0, 1.0))


def test_a_distilling_peer_moves_toward_its_teacher_beyond_what_the_data_alone_does(
    tmp_path, write_run_config, start_peer
):
    """Two lone peers of the same settings, one distilling (kl_weight 1), one pretraining, 16 steps
    each: both move away from their random start, but the distilling one ends nearer the teacher
    (measured here: KL 9.2 at the start, 7.3 after pretraining and 6.4 after distilling, in-process)."""
    teacher = tmp_path / "teacher"
    sha256 = save_teacher(teacher)
    folders = {name: tmp_path / name for name in ("distill", "pretrain")}
    for folder in folders.values():
        folder.mkdir()
    settings = dict(target_batch_size=4, lr=1e-2)  # one optimizer step per micro-batch of 4
    tomls = {name: write_run_config(folder, **settings) for name, folder in folders.items()}
    with_objective(tomls["distill"], teacher, sha256)
    peers = {name: start_peer(f"{name}-peer", toml, max_epochs=EPOCHS) for name, toml in tomls.items()}
    summaries = {name: peer.wait(timeout=300) for name, peer in peers.items()}
    assert all(summary["epoch"] >= EPOCHS and summary["samples_contributed"] > 0 for summary in summaries.values())

    runs = {name: RunConfig.load(toml) for name, toml in tomls.items()}
    assert runs["distill"].training_key() != runs["pretrain"].training_key()
    torch.manual_seed(runs["pretrain"].training.seed)
    start = held_out_kl(runs["pretrain"], dict(CausalLM(runs["pretrain"].model_config()).named_parameters()), teacher)
    kl = {name: held_out_kl(runs[name], peers[name].params(), teacher) for name in peers}
    assert kl["distill"] < 0.95 * kl["pretrain"] and kl["distill"] < 0.9 * start, (start, kl)


def test_a_peer_whose_teacher_is_not_the_run_s_is_refused_in_one_line(tmp_path, write_run_config):
    teacher = tmp_path / "teacher"
    save_teacher(teacher)
    run_toml = with_objective(write_run_config(tmp_path), teacher, "0" * 64)
    command = [sys.executable, "-m", "peer.cli", "--config", str(run_toml), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("starling-peer: error:")]
    assert "objective.teacher" in line and "is not the run's teacher" in line
