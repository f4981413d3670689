"""The memory plan (peer.memory_plan) against what training really takes, and a model that does not fit."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from coordinator.harness import LOOPBACK_MADDR, STARLING_PEER
from model import CausalLM, ModelConfig
from model.objectives import distillation_loss, teacher_top_k, top_k_distillation_loss
from peer.memory_plan import plan
from peer.optimizer import INNER_OPTIMIZERS, make_inner_optimizer
from peer.run_config import RunConfig


def run_config(preset: str, seq_len: int, mode: str = "diloco", teacher: Path | None = None) -> RunConfig:
    """A run of these shapes; with `teacher`, one distilling from the checkpoint there."""
    objective = {} if teacher is None else {"kind": "distill", "teacher": str(teacher), "teacher_sha256": "0" * 64}
    return RunConfig.from_dict(
        {
            "model": {"preset": preset},
            "data": {"seq_len": seq_len},
            "training": {"mode": mode, "optimizer": "adamw"},
            "objective": objective,
        }
    )


def measured_peak(run: RunConfig, micro_batch: int, folder: Path, distill_from: str | None = None) -> int:
    """Peak bytes of CPU tensors during one training step as a DiLoCo peer takes it (forward,
    backward, the inner AdamW step on the device), from the profiler's memory timeline; distilling
    from the run's teacher beside the model, or from its top-16 as a peer reads them from its data."""
    torch.manual_seed(0)
    model = CausalLM(run.model_config())
    optimizer = make_inner_optimizer(model.parameters(), run.training)
    tokens = torch.randint(0, run.model_config().vocab_size, (micro_batch, run.data.seq_len))
    objective = run.objective
    if distill_from is not None:
        teacher = CausalLM.from_pretrained(objective.teacher).eval().requires_grad_(False)
    if distill_from == "top-k":
        with torch.no_grad():
            top = teacher_top_k(teacher(tokens).logits, 16, objective.temperature)
        del teacher

    def step() -> None:
        if distill_from is None:
            loss = model(tokens, labels=tokens).loss
        elif distill_from == "teacher":
            with torch.no_grad():
                teacher_logits = teacher(tokens).logits
            loss = distillation_loss(model(tokens).logits, teacher_logits, tokens, objective.temperature, 0.5)
        else:
            loss = top_k_distillation_loss(model(tokens).logits, *top, tokens, objective.temperature, 0.5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from the first step on, as in training
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    timeline = folder / "memory.json"
    prof.export_memory_timeline(str(timeline), device="cpu")
    _, sizes = json.loads(timeline.read_text())
    return max(sum(point) for point in sizes)


@pytest.mark.parametrize("preset, seq_len, micro_batch", [("tiny", 32, 4), ("tiny", 128, 8), ("demo", 128, 4)])
def test_the_plan_is_at_most_a_fifth_above_the_measured_peak_and_never_below(tmp_path, preset, seq_len, micro_batch):
    """The plan's peak for a micro-batch against the profiler's peak of a real step on CPU. The
    plan counts autograd's saved tensors exactly and bounds the backward pass's transients by twice
    the float32 logits; measured, that is 3-16% above the real peak on these shapes."""
    run = run_config(preset, seq_len)
    planned = plan(run, torch.device("cpu"), "fp32").peak(micro_batch)
    measured = measured_peak(run, micro_batch, tmp_path)
    assert measured <= planned <= 1.2 * measured, (planned, measured)


@pytest.mark.parametrize("distill_from", ["teacher", "top-k"])
@pytest.mark.parametrize("seq_len, micro_batch", [(32, 4), (128, 8)])
def test_a_distilling_peer_s_plan_counts_its_teacher_and_its_loss(tmp_path, distill_from, seq_len, micro_batch):
    """The same bound for a peer distilling from a teacher twice as deep beside its model, or from
    top-k targets in its data: DISTILLATION_LOGITS' vocabulary-sized tensors per sequence, and the
    teacher's parameters, are what the step adds (the plan measured 1-9% above the real peak)."""
    torch.manual_seed(1)
    CausalLM(ModelConfig.from_preset("tiny", num_hidden_layers=4)).save_pretrained(tmp_path / "teacher")
    run = run_config("tiny", seq_len, teacher=tmp_path / "teacher")
    found = plan(run, torch.device("cpu"), "fp32", distill_from=distill_from)
    assert (found.teacher > 0) == (distill_from == "teacher")
    if distill_from == "teacher":  # on a GPU in bf16 the frozen teacher is held in bf16
        assert 2 * plan(run, torch.device("cpu"), "bf16", distill_from="teacher").teacher == found.teacher
    measured = measured_peak(run, micro_batch, tmp_path, distill_from)
    assert measured <= found.peak(micro_batch) <= 1.2 * measured, (found.peak(micro_batch), measured)


def test_batch_mode_adds_the_accumulators_and_offloads_the_optimizer():
    cpu = torch.device("cpu")
    batch, diloco = (
        plan(run_config("tiny", 32, "batch"), cpu, "fp32"),
        plan(run_config("tiny", 32, "diloco"), cpu, "fp32"),
    )
    assert batch.parameters == diloco.parameters
    assert batch.gradients == 2 * diloco.gradients  # hivemind's accumulators beside the gradients
    assert batch.optimizer_state_on_device == 0 and diloco.optimizer_state_on_device == 2 * diloco.parameters
    kept = plan(run_config("tiny", 32, "batch"), cpu, "fp32", offload=False)
    assert kept.optimizer_state_on_device == 2 * kept.parameters  # AdamW's two float32 moments


def test_the_optimizer_table_matches_the_optimizers_state():
    """The bytes of state the plan counts, and the statistics state averaging averages, are those
    the optimizers keep."""
    for name in ("adamw", "sgd"):  # the 8-bit ones need CUDA
        model = CausalLM(run_config("tiny", 32).model_config())
        run = RunConfig.from_dict({"model": {"preset": "tiny"}, "training": {"optimizer": name}})
        optimizer = make_inner_optimizer(model.parameters(), run.training)
        model(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
        optimizer.step()
        state = sum(
            value.numel() * value.element_size()
            for values in optimizer.state.values()
            for value in values.values()
            if torch.is_tensor(value) and value.dim() > 0
        )
        assert state == INNER_OPTIMIZERS[name].state_bytes * sum(p.numel() for p in model.parameters()), name
        for statistics in optimizer.state.values():
            assert set(INNER_OPTIMIZERS[name].averaged_statistics) <= set(statistics), name


@pytest.fixture
def mistral_run(tmp_path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text('run_id = "big"\n[model]\npreset = "mistral-7b"\n[data]\nseq_len = 512\n')
    return path


def starling_peer(*args: str) -> subprocess.CompletedProcess:
    command = [str(STARLING_PEER), *args, "--host-maddrs", LOOPBACK_MADDR, "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_model_that_does_not_fit_is_refused_before_training_in_one_line(mistral_run):
    result = starling_peer("--config", str(mistral_run), "--device-memory-gb", "12", "--log-level", "WARNING")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("starling-peer: error: the run's model does not fit") and "--auxiliary" in line


def test_plan_prints_what_the_model_needs_and_says_whether_it_fits(mistral_run):
    too_small = starling_peer("--config", str(mistral_run), "--device-memory-gb", "12", "--plan")
    assert too_small.returncode == 1 and "parameters 27,625 MiB" in too_small.stdout, too_small.stderr[-2000:]
    roomy = starling_peer("--config", str(mistral_run), "--device-memory-gb", "141", "--plan")
    assert roomy.returncode == 0 and "micro-batch" in roomy.stdout, roomy.stderr[-2000:]
