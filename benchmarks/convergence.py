"""Convergence: the loss of one process and of N Starling peers with each gradient codec, on the same global batch.

    python benchmarks/convergence.py                  # demo model, 2 peers, target batch 64, 30 epochs, every codec
    python benchmarks/convergence.py --compressions none adaptive-8bit --epochs 100
    python benchmarks/convergence.py --preset tiny --target-batch 16 --epochs 3 --matchmaking-time 2   # a quick check
    python benchmarks/convergence.py --compressions adaptive-8bit --diloco-rounds 6   # DiLoCo beside batch mode
    python benchmarks/convergence.py --compressions adaptive-8bit --diloco-rounds 6 12 --overlap off on
    python benchmarks/convergence.py --peers 4 --compressions adaptive-8bit --group-key-bits 0 1   # Moshpit

Configurations, each a fresh run with the same run settings for --epochs epochs, so the same
number of optimizer steps on the same global batch (--target-batch samples per step):
(a) one process: a single peer with micro-batch N x --batch-size and N x --threads threads,
    alone in its swarm (no averaging);
(b) N Starling peers, one run per gradient codec (run config [averaging] compression) and number
    of matchmaking key bits (--group-key-bits, [averaging] group_key_bits: Moshpit averaging in
    groups under 2^bits keys, peers changing key after each round);
(c) with --diloco-rounds R: N peers in DiLoCo mode, R outer rounds of the same samples in all
    (--epochs x --target-batch / R per round), inner steps of --inner-batch samples on each peer
    at the same lr, with the warm-up scaled to rounds; one swarm per number of rounds, outer lr
    (--outer-lrs) and overlap (--overlap).
A swarm's epoch can hold more samples than the target: peers go on computing until they learn
that the swarm reached it. So the table and the curves count the samples actually contributed.

Data: the bundled plays but the last --held-out ones train; the held-out loss is the mean token
loss of peer 0's final parameters (the spread is how far the other peers' final parameters are
from peer 0's, the largest relative L2 distance) on the first --eval-sequences sequences of the held-out plays
(every peer steps on the same averaged gradient, up to the codec's error on the parts others
reduced, and state is averaged every --average-state-every epochs, so peers agree closely). The
curves are the training loss of each epoch (mean over that epoch's micro-batches of all peers)
against the samples contributed before it, with the held-out loss as a star at the end.
Prints a table and writes benchmarks/results/convergence-<device>.json and
benchmarks/results/convergence.png (convergence-<device>-diloco.json and convergence-diloco.png
with --diloco-rounds, convergence-<device>-group-keys.json and convergence-group-keys.png with
--group-key-bits other than 0; needs matplotlib: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from dataclasses import replace
from itertools import product
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from benchmarks.measure import RESULTS, write_json  # noqa: E402
from benchmarks.swarm_runs import (  # noqa: E402
    RunSettings,
    SwarmOptions,
    add_group_key_bits_argument,
    add_overlap_argument,
    add_swarm_arguments,
    run_settings,
    run_swarm,
    swarm_arguments,
    swarm_options,
)
from model import CausalLM  # noqa: E402
from model.data import bundled_corpus_files, load_corpus  # noqa: E402
from peer.run_config import (  # noqa: E402
    COMPRESSIONS,
    PSEUDO_GRADIENT_COMPRESSIONS,
    DilocoSection,
    RunConfig,
)

EVAL_BATCH = 16  # sequences per forward pass of the held-out evaluation


def split_corpus(folder: Path, held_out: int) -> tuple[Path, Path]:
    """Folders of links to the bundled plays: all but the last `held_out` to train on, and those."""
    files = bundled_corpus_files()
    train, test = folder / "train", folder / "held-out"
    for target, chosen in ((train, files[:-held_out]), (test, files[-held_out:])):
        target.mkdir()
        for file in chosen:
            (target / file.name).symlink_to(file)
    return train, test


def diloco_settings(
    settings: RunSettings,
    rounds: int,
    inner_batch: int,
    compression: str,
    outer_lr: float,
    outer_momentum: float,
    overlap: bool,
) -> RunSettings:
    """`settings` in DiLoCo mode: `rounds` outer rounds holding the samples of all its epochs, the
    warm-up in the same share of training (at least a round when there is one)."""
    samples = settings.target_batch_size * settings.total_epochs
    warmup = max(1, round(settings.warmup_epochs * rounds / settings.total_epochs)) if settings.warmup_epochs else 0
    return replace(
        settings,
        mode="diloco",
        samples_per_round=samples // rounds,
        inner_batch_size=inner_batch,
        diloco_compression=compression,
        outer_lr=outer_lr,
        outer_momentum=outer_momentum,
        overlap=overlap,
        total_epochs=rounds,
        warmup_epochs=warmup,
    )


def held_out_loss(run: RunConfig, sequences: torch.Tensor, params: dict[str, torch.Tensor] | None) -> float:
    """Mean token loss on `sequences` of the run's initial model, or of `params` when given."""
    torch.manual_seed(run.training.seed)  # the initial weights every peer starts from
    model = CausalLM(run.model_config()).eval()
    if params is not None:
        assert set(params) == {name for name, _ in model.named_parameters()}, "parameters do not match the model"
        model.load_state_dict(params, strict=False)  # buffers are rebuilt, not saved
    with torch.no_grad():
        total = sum(model(chunk, labels=chunk).loss.item() * len(chunk) for chunk in sequences.split(EVAL_BATCH))
    return total / len(sequences)


def distance(params: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """Relative L2 distance of `other` from `params`, over all parameters."""
    difference = sum(float((other[name] - value).square().sum()) for name, value in params.items())
    return (difference / sum(float(value.square().sum()) for value in params.values())) ** 0.5


def loss_curve(peers: list[dict]) -> list[dict]:
    """Training loss per epoch (the mean over all peers' micro-batches of that epoch), against the
    samples the whole swarm had contributed before that epoch."""
    losses: dict[int, list[tuple[float, int]]] = defaultdict(list)
    before: dict[int, int] = defaultdict(int)
    for peer in peers:
        for record in peer["epochs"]:
            before[record["epoch"]] += record["samples_contributed"]
            if record["train_loss"] is not None:
                losses[record["epoch"] - 1].append((record["train_loss"], record["micro_batches"]))
    return [
        dict(
            epoch=epoch,
            samples=before[epoch],
            train_loss=sum(loss * n for loss, n in entries) / sum(n for _, n in entries),
        )
        for epoch, entries in sorted(losses.items())
    ]


def plot(configs: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 5))
    for config in configs:
        curve = config["curve"]
        (line,) = axes.plot(
            [p["samples"] for p in curve],
            [p["train_loss"] for p in curve],
            label=f"{config['name']}, held-out {config['held_out_loss']:.3f}",
        )
        axes.plot([config["samples"]], [config["held_out_loss"]], marker="*", markersize=12, color=line.get_color())
    axes.set_xlabel("samples contributed")
    axes.set_ylabel("loss (lines: training, per epoch; stars: held-out, at the end)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_swarm_arguments(parser, peers=2)
    parser.add_argument(
        "--target-batch", type=int, default=64, help="samples per optimizer step, for every configuration"
    )
    parser.add_argument("--epochs", type=int, default=30, help="optimizer steps of every configuration")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="linear warm-up, then cosine decay over --epochs")
    parser.add_argument(
        "--compressions",
        nargs="+",
        default=list(COMPRESSIONS),
        choices=COMPRESSIONS,
        help="gradient codecs, one swarm each",
    )
    parser.add_argument(
        "--diloco-rounds", type=int, nargs="*", default=[], help="outer rounds of DiLoCo swarms on the same samples"
    )
    parser.add_argument(
        "--outer-lrs", type=float, nargs="+", default=[DilocoSection.outer_lr], help="DiLoCo swarms' outer lrs"
    )
    parser.add_argument(
        "--outer-momentums",
        type=float,
        nargs="+",
        default=[DilocoSection.outer_momentum],
        help="DiLoCo swarms' outer Nesterov momentums",
    )
    add_overlap_argument(parser)
    parser.add_argument(
        "--inner-batch", type=int, default=DilocoSection.inner_batch_size, help="samples per inner step in DiLoCo mode"
    )
    parser.add_argument(
        "--diloco-compression",
        default=DilocoSection.compression,
        choices=PSEUDO_GRADIENT_COMPRESSIONS,
        help="the pseudo-gradients' codec in DiLoCo mode",
    )
    add_group_key_bits_argument(parser, "batch-mode swarms of each codec")
    parser.add_argument("--held-out", type=int, default=2, help="bundled plays kept out of training")
    parser.add_argument("--eval-sequences", type=int, default=128, help="held-out sequences the loss is measured on")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="starling-convergence-"))
    print(f"logs in {folder}", flush=True)
    train, test = split_corpus(folder, args.held_out)
    settings = run_settings(
        args,
        target_batch_size=args.target_batch,
        warmup_epochs=args.warmup_epochs,
        total_epochs=args.epochs,
        data=str(train),
    )
    swarm = swarm_options(args)
    solo = SwarmOptions(
        peers=1,
        batch_size=args.peers * args.batch_size,
        threads=args.peers * args.threads,
        device=args.device,
        timeout=args.timeout,
    )
    plans = [("one process", replace(settings, compression="none"), solo)] + [
        (
            f"{args.peers} peers, {codec}" + (f", {2**bits} matchmaking keys" if bits else ""),
            replace(settings, compression=codec, group_key_bits=bits),
            swarm,
        )
        for codec, bits in product(args.compressions, args.group_key_bits)
    ]
    outers = product(args.outer_lrs, args.outer_momentums)
    for rounds, (outer_lr, outer_momentum), overlap in product(args.diloco_rounds, outers, args.overlap):
        diloco = diloco_settings(
            settings,
            rounds,
            args.inner_batch,
            args.diloco_compression,
            outer_lr,
            outer_momentum,
            overlap=overlap == "on",
        )
        name = (
            f"{args.peers} peers, DiLoCo {args.diloco_compression}, {rounds} rounds,"
            f" outer lr {outer_lr:g} momentum {outer_momentum:g}"
        )
        plans.append((name + (", overlap" if overlap == "on" else ""), diloco, swarm))

    run_tomls = [
        plan.write(folder / f"run-{index}.toml", run_id=f"convergence-{index}")
        for index, (_, plan, _) in enumerate(plans)
    ]
    run = RunConfig.load(run_tomls[0])  # the model and seed, the same in every configuration
    sequences = load_corpus(test, seq_len=args.seq_len).sequences[: args.eval_sequences]
    initial = held_out_loss(run, sequences, None)
    configs = []
    for index, ((name, plan, options), run_toml) in enumerate(zip(plans, run_tomls)):
        result = run_swarm(folder / f"run-{index}", run_toml, options, max_epochs=plan.total_epochs)
        peers = result["peers"]
        params, *others = (
            load_file(folder / f"run-{index}" / f"peer-{peer}" / "params.safetensors") for peer in range(options.peers)
        )
        configs.append(
            dict(
                name=name,
                mode=plan.mode,
                compression=plan.diloco_compression if plan.mode == "diloco" else plan.compression,
                outer_lr=plan.outer_lr if plan.mode == "diloco" else None,
                outer_momentum=plan.outer_momentum if plan.mode == "diloco" else None,
                overlap=plan.overlap if plan.mode == "diloco" else None,
                peers=options.peers,
                micro_batch=options.batch_size,
                samples=sum(peer["samples_contributed"] for peer in peers),
                epochs=min(peer["epoch"] for peer in peers),
                group_key_bits=plan.group_key_bits,
                held_out_loss=held_out_loss(run, sequences, params),
                spread=max((distance(params, other) for other in others), default=0.0),
                training_s=max(peer["training_ended"] for peer in peers)
                - min(peer["training_started"] for peer in peers),
                rounds_succeeded=sum(peer["rounds_succeeded"] for peer in peers),
                rounds_failed=sum(peer["rounds_failed"] for peer in peers),
                curve=loss_curve(peers),
            )
        )
        print(f"{name}: held-out loss {configs[-1]['held_out_loss']:.4f}", flush=True)

    device = torch.device(args.device).type
    suffix = "-diloco" if args.diloco_rounds else "-group-keys" if any(args.group_key_bits) else ""
    path = write_json(
        f"convergence-{device}{suffix}.json",
        dict(
            **swarm_arguments(args),
            target_batch_size=args.target_batch,
            epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            diloco_rounds=args.diloco_rounds,
            group_key_bits=args.group_key_bits,
            inner_batch=args.inner_batch,
            held_out_plays=[p.name for p in sorted(test.iterdir())],
            eval_sequences=len(sequences),
            initial_held_out_loss=initial,
            configs=configs,
        ),
    )
    plot(
        configs,
        f"{args.preset}, target batch {args.target_batch}, {args.epochs} epochs ({device})",
        RESULTS / f"convergence{suffix}.png",
    )

    baseline = configs[0]["held_out_loss"]
    print(f"initial held-out loss {initial:.4f} on {len(sequences)} sequences")
    print(
        "| configuration | samples | epochs | held-out loss | vs one process | last epoch's training loss | "
        "spread | training s | rounds ok/failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in configs:
        last = config["curve"][-1]["train_loss"] if config["curve"] else float("nan")
        print(
            f"| {config['name']} | {config['samples']} | {config['epochs']} | {config['held_out_loss']:.4f} | "
            f"{config['held_out_loss'] - baseline:+.4f} | {last:.4f} | {config['spread']:.2e} | "
            f"{config['training_s']:.1f} | "
            f"{config['rounds_succeeded']}/{config['rounds_failed']} |"
        )
    print(f"written to {path} and {RESULTS / f'convergence{suffix}.png'}")


if __name__ == "__main__":
    main()
