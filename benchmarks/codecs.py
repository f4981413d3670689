"""Gradient codecs side by side: Starling's 8-bit blockwise codec (peer.codec) and every hivemind codec.

    python benchmarks/codecs.py                          # 512 Ki, 1 M, 10 M and 100 M float32 values
    python benchmarks/codecs.py --sizes 4194304 --repeats 9
    python benchmarks/codecs.py --threads 1              # one thread: steadier on a busy machine

Data: float32 N(0,1) values. 2**19 values is about what one call codes inside an all-reduce:
hivemind cuts tensors into parts of 512 KiB after compression, about 516 K values at 8 bits.
Each codec encodes with compress() and decodes through hivemind's
deserialize_torch_tensor (Starling's decoder installed with peer.codec.register()), warmed up
first (bitsandbytes' first call costs seconds), then timed in interleaved rounds (medians).
Columns: compress and decode GB/s are float32 bytes (4 per value) per second, bytes/value is
the length of the message's buffer over the number of values, error is the relative L2 error
of the decoded tensor, and x blockwise is the compress+decode throughput over that of hivemind's
BlockwiseQuantization on the same data. Prints a table and writes benchmarks/results/codecs-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/, first

import torch  # noqa: E402
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor  # noqa: E402

from benchmarks.measure import codec_table, machine, median_seconds, write_json  # noqa: E402

BASELINE = "hivemind BlockwiseQuantization"


def label(codec: CompressionBase) -> str:
    """A codec's row name: whose it is and its class (such as "starling Blockwise8Bit")."""
    owner = "starling" if type(codec).__module__.startswith("peer.") else "hivemind"
    return f"{owner} {type(codec).__name__}"


def measure(numel: int, repeats: int) -> list[dict]:
    """One row per codec for numel N(0,1) float32 values."""
    torch.manual_seed(0)
    x = torch.randn(numel)
    info = CompressionInfo.from_tensor(x)
    messages, steps = {}, {}
    for codec in (make() for make in codec_table().values()):
        name = label(codec)
        messages[name] = codec.compress(x, info)
        steps[f"{name} compress"] = lambda codec=codec: codec.compress(x, info)
        steps[f"{name} decode"] = lambda message=messages[name]: deserialize_torch_tensor(message)
    seconds = median_seconds(steps, torch.device("cpu"), repeats)
    rows = []
    for name, message in messages.items():
        decoded = deserialize_torch_tensor(message)
        assert decoded.dtype == x.dtype and decoded.shape == x.shape, name
        compress, decode = seconds[f"{name} compress"], seconds[f"{name} decode"]
        rows.append(
            dict(
                codec=name,
                numel=numel,
                compress_s=compress,
                decode_s=decode,
                compress_gb_s=4 * numel / compress / 1e9,
                decode_gb_s=4 * numel / decode / 1e9,
                bytes_per_value=len(message.buffer) / numel,
                relative_error=((decoded - x).norm() / x.norm()).item(),
            )
        )
        del decoded
    baseline = next(row for row in rows if row["codec"] == BASELINE)
    for row in rows:
        row["x_blockwise"] = (baseline["compress_s"] + baseline["decode_s"]) / (row["compress_s"] + row["decode_s"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2**19, 10**6, 10**7, 10**8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch (and OpenMP) threads; default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(
        f"{'values':>11}  {'codec':<36}{'compress GB/s':>14}{'decode GB/s':>12}{'bytes/value':>12}"
        f"{'error':>9}{'x blockwise':>12}"
    )
    for numel in args.sizes:
        for row in measure(numel, args.repeats):
            rows.append(row)
            print(
                f"{numel:>11}  {row['codec']:<36}{row['compress_gb_s']:>14.3f}{row['decode_gb_s']:>12.3f}"
                f"{row['bytes_per_value']:>12.4f}{row['relative_error']:>9.4f}{row['x_blockwise']:>12.2f}"
            )
    path = write_json(
        "codecs-cpu.json",
        dict(
            device=machine(torch.device("cpu")),
            torch=torch.__version__,
            repeats=args.repeats,
            data="float32 N(0,1)",
            command=" ".join(["python", "benchmarks/codecs.py", *sys.argv[1:]]),
            rows=rows,
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
