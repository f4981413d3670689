"""The cost of robust aggregation: reducing one all-reduce part with CenteredClip against the weighted mean.

    python benchmarks/aggregation.py                     # parts of 516,222 values from 3, 4 and 8 senders
    python benchmarks/aggregation.py --senders 16 --repeats 9

In hivemind's butterfly all-reduce each peer reduces one slice of every tensor, a part at a
time (about 516 K values per part with Starling's 8-bit codec). `mean` is what hivemind's
TensorPartReducer does: add each sender's part, weighted, then divide; `centered-clip` is
peer.robust.centered_clip on the same parts: honest senders (a shared direction plus 10% noise
each, as peers of one model), and the same with one sender scaled by 1e6. Timed in interleaved
rounds (medians) on one thread. `x mean` is the time over the mean's; `ms per 10 M values` scales
the per-part time to the parts one peer reduces in a round of a 10 M-value gradient among that
many peers. Prints a table and writes benchmarks/results/aggregation-cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

import torch  # noqa: E402

from benchmarks.measure import machine, median_seconds, write_json  # noqa: E402
from peer.robust import centered_clip  # noqa: E402

PART_VALUES = 516_222  # 512 KiB of 8-bit payload: hivemind's default part size with Starling's codec
GRADIENT_VALUES = 10_000_000


def weighted_mean(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """hivemind's TensorPartReducer: accumulate each part with its weight, then divide."""
    accumulator = torch.zeros_like(parts[0])
    for part, weight in zip(parts, weights):
        accumulator.add_(part, alpha=weight)
    return accumulator.div_(sum(weights))


def measure(senders: int, repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(senders)
    shared = torch.randn(PART_VALUES, generator=generator)
    honest = [shared + 0.1 * torch.randn(PART_VALUES, generator=generator) for _ in range(senders)]
    attacked = honest[:-1] + [honest[-1] * 1e6]
    weights = [float(8 * (i + 1)) for i in range(senders)]
    weight_tensor = torch.tensor(weights)
    steps = {
        "mean": lambda: weighted_mean(honest, weights),
        "centered-clip": lambda: centered_clip(honest, weight_tensor),
        "centered-clip, one sender x1e6": lambda: centered_clip(attacked, weight_tensor),
    }
    seconds = median_seconds(steps, torch.device("cpu"), repeats)
    parts_per_round = GRADIENT_VALUES / senders / PART_VALUES
    return [
        dict(
            senders=senders,
            aggregation=name,
            part_values=PART_VALUES,
            ms_per_part=1e3 * s,
            x_mean=s / seconds["mean"],
            ms_per_10m_round=1e3 * s * parts_per_round,
        )
        for name, s in seconds.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--senders", type=int, nargs="+", default=[3, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'senders':>8}  {'aggregation':<32}{'ms per part':>12}{'x mean':>8}{'ms per 10 M values':>20}")
    for senders in args.senders:
        for row in measure(senders, args.repeats):
            rows.append(row)
            print(
                f"{senders:>8}  {row['aggregation']:<32}{row['ms_per_part']:>12.2f}{row['x_mean']:>8.2f}"
                f"{row['ms_per_10m_round']:>20.1f}"
            )
    path = write_json(
        "aggregation-cpu.json",
        dict(
            device=machine(torch.device("cpu")),
            torch=torch.__version__,
            repeats=args.repeats,
            command=" ".join(["python", "benchmarks/aggregation.py", *sys.argv[1:]]),
            rows=rows,
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
