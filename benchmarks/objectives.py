"""What each training objective costs a peer: tokens/s and the memory autograd keeps, on the demo
model's shapes, for pretraining, supervised fine-tuning and distillation from a teacher twice as
deep (run beside the student, or its top-16 log-probs precomputed into the data); then held-out
KL to the teacher and loss during distillation (both ways) against next-token training alone, at
equal samples (on the tiny model, so that it runs in minutes on a CPU).

    python benchmarks/objectives.py                  # CPU
    python benchmarks/objectives.py --device cuda

Each step is a training micro-batch as a peer runs it (forward with the objective's loss, backward).
Prints two tables and writes benchmarks/results/objectives-<device>.json and, with matplotlib
(pip install -e '.[bench]'), objectives-<device>.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # as in benchmarks/model.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.measure import machine, median_seconds, mib, peak_bytes, saved_bytes, write_json  # noqa: E402
from model import CausalLM, ModelConfig  # noqa: E402
from model.chat import CHAT_VOCAB, inputs_and_labels  # noqa: E402
from model.data import load_corpus  # noqa: E402
from model.objectives import distillation_loss, teacher_top_k, top_k_distillation_loss  # noqa: E402

TEMPERATURE, KL_WEIGHT = 2.0, 0.5  # the run config's defaults ([objective])
TOP_K = 16  # starling-data teacher-targets' default


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    config = ModelConfig.from_preset(args.preset, vocab_size=CHAT_VOCAB)  # SFT needs the instruct vocabulary
    torch.manual_seed(0)
    student = CausalLM(config).to(device).train()
    teacher_config = ModelConfig.from_preset(
        args.preset, vocab_size=CHAT_VOCAB, num_hidden_layers=2 * config.num_hidden_layers
    )
    teacher = CausalLM(teacher_config).to(device).eval().requires_grad_(False)
    ids = torch.randint(0, CHAT_VOCAB, (args.batch, args.seq), device=device)
    # Conversations: about 40% of the tokens are the assistant's (the synthetic chats of the tests).
    stored = ids + CHAT_VOCAB * (torch.rand(ids.shape, device=device) > 0.4)
    inputs, labels = inputs_and_labels(stored)

    def pretrain() -> None:
        student(ids, labels=ids).loss.backward()

    def sft() -> None:
        student(inputs, labels=labels).loss.backward()

    def distill() -> None:
        with torch.no_grad():
            teacher_logits = teacher(ids).logits
        distillation_loss(student(ids).logits, teacher_logits, ids, TEMPERATURE, KL_WEIGHT).backward()

    with torch.no_grad():  # what starling-data teacher-targets stores: the step reads it with the tokens
        top_ids, top_log_probs = teacher_top_k(teacher(ids).logits, TOP_K, TEMPERATURE)

    def distill_top_k() -> None:
        student_logits = student(ids).logits
        top_k_distillation_loss(student_logits, top_ids, top_log_probs, ids, TEMPERATURE, KL_WEIGHT).backward()

    steps = {"pretrain": pretrain, "sft": sft, "distill": distill, f"top-{TOP_K}": distill_top_k}
    seconds = median_seconds(steps, device, args.repeats)
    student.zero_grad(set_to_none=True)
    tokens = args.batch * args.seq
    rows = []
    print(f"{'objective':<12}{'tokens/s':>10}{'x pretrain':>12}{'saved MiB':>11}{'peak MiB':>10}")
    for name, step in steps.items():
        row = dict(
            objective=name,
            tokens_per_s=tokens / seconds[name],
            relative=seconds["pretrain"] / seconds[name],
            saved_bytes=saved_bytes(step),
            peak_bytes=peak_bytes(step, device),
        )
        student.zero_grad(set_to_none=True)
        rows.append(row)
        print(
            f"{name:<12}{row['tokens_per_s']:>10.0f}{row['relative']:>12.2f}{mib(row['saved_bytes']):>11}{mib(row['peak_bytes']):>10}"
        )
    return rows


def held_out(student: CausalLM, teacher: CausalLM, batch: torch.Tensor) -> tuple[float, float]:
    """KL(teacher || student) per token at temperature 1, and the student's next-token loss."""
    with torch.no_grad():
        student_logits, teacher_logits = student(batch).logits[:, :-1], teacher(batch).logits[:, :-1]
        kl = F.kl_div(
            F.log_softmax(student_logits, -1).flatten(0, 1),
            F.log_softmax(teacher_logits, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss = F.cross_entropy(student_logits.flatten(0, 1), batch[:, 1:].flatten())
    return kl.item(), loss.item()


def curves(args: argparse.Namespace) -> list[dict]:
    """A tiny student trained by distillation and by next-token loss alone, from the same start and
    on the same batches, from a teacher of twice its depth trained first."""
    sequences = load_corpus(seq_len=64).sequences
    train, test = sequences[:-64], sequences[-64:]
    torch.manual_seed(0)
    teacher = CausalLM(ModelConfig.from_preset("tiny", num_hidden_layers=4))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(args.teacher_steps):
        batch = train[(step * 16) % (len(train) - 16) :][:16]
        teacher(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval().requires_grad_(False)
    torch.manual_seed(1)
    start = CausalLM(ModelConfig.from_preset("tiny")).state_dict()
    points = []
    objectives = ("distill", f"top-{TOP_K}", "next-token")
    for objective in objectives:
        student = CausalLM(ModelConfig.from_preset("tiny"))
        student.load_state_dict(start)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
        for step in range(args.student_steps + 1):
            if step % args.every == 0:
                kl, loss = held_out(student.eval(), teacher, test)
                points.append(dict(objective=objective, step=step, samples=step * 8, kl=kl, loss=loss))
                student.train()
            batch = train[(step * 8) % (len(train) - 8) :][:8]
            if objective == "next-token":
                loss = student(batch, labels=batch).loss
            else:
                with torch.no_grad():
                    teacher_logits = teacher(batch).logits
                if objective == "distill":
                    loss = distillation_loss(student(batch).logits, teacher_logits, batch, TEMPERATURE, KL_WEIGHT)
                else:  # the targets a peer reads from its data
                    top = teacher_top_k(teacher_logits, TOP_K, TEMPERATURE)
                    loss = top_k_distillation_loss(student(batch).logits, *top, batch, TEMPERATURE, KL_WEIGHT)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    header = "".join(f"{f'KL {name}':>16}" for name in objectives) + "".join(
        f"{f'loss {name}':>18}" for name in objectives
    )
    print(f"{'samples':>8}{header}")
    by = {(p["objective"], p["samples"]): p for p in points}
    for samples in sorted({p["samples"] for p in points}):
        kls = "".join(f"{by[(name, samples)]['kl']:>16.3f}" for name in objectives)
        losses = "".join(f"{by[(name, samples)]['loss']:>18.3f}" for name in objectives)
        print(f"{samples:>8}{kls}{losses}")
    return points


def plot(points: list[dict], path: Path) -> None:
    """Held-out KL to the teacher and next-token loss against samples, one line per objective."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (kl_axes, loss_axes) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    for objective in dict.fromkeys(p["objective"] for p in points):
        curve = [p for p in points if p["objective"] == objective]
        samples = [p["samples"] for p in curve]
        kl_axes.plot(samples, [p["kl"] for p in curve], label=objective)
        loss_axes.plot(samples, [p["loss"] for p in curve], label=objective)
    for axes, label in (
        (kl_axes, "held-out KL(teacher || student) per token"),
        (loss_axes, "held-out next-token loss"),
    ):
        axes.set_xlabel("samples")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"tiny student, teacher twice as deep; T = {TEMPERATURE}, kl_weight = {KL_WEIGHT}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = throughput(args, device)
    points = curves(args)
    path = write_json(
        f"objectives-{device.type}.json",
        dict(
            device=machine(device),
            preset=args.preset,
            batch=args.batch,
            seq=args.seq,
            repeats=args.repeats,
            temperature=TEMPERATURE,
            kl_weight=KL_WEIGHT,
            torch=torch.__version__,
            command=" ".join(["python", "benchmarks/objectives.py", *sys.argv[1:]]),
            rows=rows,
            curves=points,
        ),
    )
    print(f"wrote {path}")
    try:
        plot(points, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError:
        print("matplotlib is missing: no plot (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
