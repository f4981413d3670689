"""Single-process training: the demo model learns the corpus; bad input exits 2 with one line."""

import subprocess
import sys

import torch

from model import CausalLM, ModelConfig
from model.data import load_corpus
from model.train import TrainSettings, train
from tests.commands import run_at_once


def test_demo_model_loss_falls_within_a_few_dozen_steps():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("demo"))
    corpus = load_corpus(seq_len=64)
    losses = train(model, corpus, TrainSettings(steps=30, batch_size=4, warmup_steps=5), log_every=0)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 10.0  # about ln(32000) at random initialisation
    assert last < first - 3.0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "model.train", *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    cases = [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--kernels", "fast"], "kernels"),
        (["--steps", "0"], "--steps"),
    ]
    results = run_at_once([[sys.executable, "-m", "model.train", *args] for args, _ in cases])
    for (args, culprit), result in zip(cases, results):
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0], (args, result.stderr)


def test_cli_unknown_option_exits_2():
    result = run_cli("--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
