"""Single-process training of a preset on a corpus: the baseline a swarm is compared against.

starling-train --preset demo --steps 200
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import PRESETS, ModelConfig
from model.data import PackedCorpus, load_corpus
from model.transformer import CausalLM
from model.weight_decay import parameter_groups

logger = logging.getLogger("starling.train")


@dataclass
class TrainSettings:
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model: CausalLM, corpus: PackedCorpus, settings: TrainSettings, log_every: int = 10) -> list[float]:
    """Train for `settings.steps` steps on random batches of the corpus; returns the loss per step."""
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        parameter_groups(model.parameters(), settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(settings.steps):
        rows = torch.randint(len(corpus), (settings.batch_size,), generator=generator)
        batch = corpus.sequences[rows].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            tokens_per_s = (step + 1) * batch.numel() / (time.perf_counter() - started)
            logger.info(
                "step %d/%d  loss %.3f  lr %.2e  %.0f tokens/s",
                step + 1,
                settings.steps,
                losses[-1],
                lr_at(step, settings),
                tokens_per_s,
            )
    return losses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="starling-train", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help=f"model preset: {', '.join(PRESETS)}")
    parser.add_argument("--data", default=None, help="text file or folder to train on (default: the bundled plays)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size, help="sequences per step")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=TrainSettings.lr, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches")
    parser.add_argument("--save", type=Path, default=None, help="write the trained model here (HF format)")
    parser.add_argument("--kernels", default="auto", help="kernel path: auto, torch or triton")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        if args.steps <= 0 or args.batch_size <= 0:
            raise ValueError("--steps and --batch-size must be positive")
        config = ModelConfig.from_preset(args.preset, kernels=args.kernels)
        corpus = load_corpus(args.data, seq_len=args.seq_len, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"starling-train: error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = CausalLM(config)
    logger.info(
        "preset %s: %.1fM parameters; corpus: %d sequences of %d tokens",
        args.preset,
        model.num_parameters() / 1e6,
        len(corpus),
        corpus.seq_len,
    )
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    losses = train(model, corpus, settings)
    logger.info("loss %.3f -> %.3f over %d steps", losses[0], losses[-1], len(losses))
    if args.save is not None:
        model.save_pretrained(args.save)
        logger.info("saved to %s", args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
