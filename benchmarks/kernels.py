"""Forward+backward time and memory of each fused operation against its PyTorch reference.

    python benchmarks/kernels.py                 # CPU: reference eager vs torch.compile
    python benchmarks/kernels.py --device cuda   # adds the Triton kernels, and Liger-Kernel if installed

Shapes are those of the demo preset and of one Mistral 7B layer. `GB/s` is the effective memory
bandwidth of the memory-bound operations: the bytes their forward and backward must at least read
and write (inputs, outputs and gradients once each; for the codec, float32 in, codes and scales
out, and back) over the time; compare it with the device's peak (an H100 SXM has 3.35 TB/s, an
H200 4.8 TB/s). Prints a table and writes benchmarks/results/kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, the path starts at benchmarks/, whose model.py and kernels.py would shadow
# the model package and the "kernels" package that transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.measure import machine, median_seconds, mib, peak_bytes, saved_bytes, write_json  # noqa: E402
from model import ModelConfig, kernels  # noqa: E402
from model.kernels.cross_entropy import linear_cross_entropy_reference  # noqa: E402
from model.kernels.quantize import dequantize_blockwise_reference, quantize_blockwise_reference  # noqa: E402
from model.kernels.rms_norm import rms_norm_reference  # noqa: E402
from model.kernels.rotary import rotary_reference  # noqa: E402
from model.kernels.swiglu import swiglu_reference  # noqa: E402
from model.rope import rope_cos_sin  # noqa: E402

Op = Callable[..., Any]


def liger_ops() -> dict[str, Op]:
    """Liger-Kernel's versions of the operations, where the package is installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, liger_rotary_pos_emb
    except ImportError:
        return {}
    flce = LigerFusedLinearCrossEntropyLoss()
    return {
        "rms_norm": lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps),
        "swiglu": LigerSiLUMulFunction.apply,
        "rotary": lambda q, k, cos, sin: liger_rotary_pos_emb(q, k, cos, sin),
        "linear_cross_entropy": lambda h, w, labels: flce(w, h, labels),
    }


def codec_reference(x: torch.Tensor) -> torch.Tensor:
    return dequantize_blockwise_reference(quantize_blockwise_reference(x), x.numel())


def codec_fused(x: torch.Tensor) -> torch.Tensor:
    return kernels.dequantize_blockwise(kernels.quantize_blockwise(x, mode="triton"), x.numel(), mode="triton")


def fused(name: str) -> Op:
    dispatch = getattr(kernels, name)
    return lambda *args: dispatch(*args, mode="triton")


def cases(config: ModelConfig, tokens: int, dtype: torch.dtype, device: torch.device):
    """(operation name, reference, fused, input builder, step, bytes moved) for one model shape.
    The builder makes fresh leaf inputs; the step runs forward and backward (where there is one) of
    an operation; bytes moved is what that must at least read and write (None: compute-bound)."""
    seq = min(tokens, 2048)
    batch = tokens // seq
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.attention_head_dim
    size = torch.finfo(dtype).bits // 8
    heads = config.num_attention_heads + config.num_key_value_heads
    codec_values = hidden * inter
    moved = {  # forward + backward, each tensor read or written once
        "rms_norm": 5 * tokens * hidden * size,  # x, y; x, dy, dx
        "swiglu": 8 * tokens * inter * size,  # gate, up, out; dout, gate, up, dgate, dup
        "rotary": 4 * tokens * heads * head_dim * size,  # q, k in place, then their gradients in place
        "codec_roundtrip": 2 * codec_values * 4
        + 2 * (codec_values + codec_values // 256 * 4),  # float32 <-> codes+scales
    }

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    def norm_inputs():
        return leaf(tokens, hidden), leaf(hidden)

    def norm_step(op, x, w):
        op(x, w, config.rms_norm_eps).backward(torch.ones_like(x))

    def swiglu_inputs():
        return (leaf(tokens, 2 * inter),)

    def swiglu_step(op, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        op(gate, up).backward(torch.ones_like(gate))

    def rotary_inputs():
        cos, sin = rope_cos_sin(torch.arange(seq, device=device).expand(batch, -1), head_dim, config.rope_theta, dtype)
        return (
            leaf(batch, config.num_attention_heads, seq, head_dim),
            leaf(batch, config.num_key_value_heads, seq, head_dim),
            cos,
            sin,
        )

    def rotary_step(op, q, k, cos, sin):
        q_out, k_out = op(q.clone(), k.clone(), cos, sin)  # clones: the fused path rotates in place
        torch.autograd.backward((q_out, k_out), (torch.ones_like(q_out), torch.ones_like(k_out)))

    def ce_inputs():
        labels = torch.randint(0, config.vocab_size, (tokens,), device=device)
        return leaf(tokens, hidden), leaf(config.vocab_size, hidden, scale=hidden**-0.5), labels

    def ce_step(op, h, w, labels):
        op(h, w, labels).backward()

    def codec_inputs():  # a gradient the size of one feed-forward projection
        return (torch.randn(hidden * inter, device=device),)

    def codec_step(op, x):
        op(x)

    return [
        ("rms_norm", rms_norm_reference, fused("rms_norm"), norm_inputs, norm_step, moved["rms_norm"]),
        ("swiglu", swiglu_reference, fused("swiglu"), swiglu_inputs, swiglu_step, moved["swiglu"]),
        ("rotary", rotary_reference, fused("rotary"), rotary_inputs, rotary_step, moved["rotary"]),
        (
            "linear_cross_entropy",
            linear_cross_entropy_reference,
            fused("linear_cross_entropy"),
            ce_inputs,
            ce_step,
            None,
        ),
        ("codec_roundtrip", codec_reference, codec_fused, codec_inputs, codec_step, moved["codec_roundtrip"]),
    ]


def providers(
    name: str, reference: Op, fused_op: Op, device: torch.device, compile_reference: bool, liger: dict[str, Op]
):
    yield "torch", reference
    if compile_reference:
        yield "torch.compile", torch.compile(reference, dynamic=False)
    if device.type == "cuda":
        yield "triton", fused_op
        if name in liger:
            yield "liger", liger[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs=2,
        default=None,
        metavar=("DEMO", "MISTRAL"),
        help="tokens per call for the two shapes (default: 1024 128 on CPU, 16384 8192 on CUDA)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokens = args.tokens or ((16384, 8192) if device.type == "cuda" else (1024, 128))
    liger = liger_ops() if device.type == "cuda" else {}
    torch.manual_seed(0)

    rows = []
    print(
        f"{'shape':<12}{'operation':<22}{'provider':<15}{'ms':>10}{'x torch':>9}{'GB/s':>8}{'saved MiB':>11}"
        f"{'peak MiB':>10}"
    )
    for preset, n in zip(("demo", "mistral-7b"), tokens):
        config = ModelConfig.from_preset(preset)
        for name, reference, fused_op, make_inputs, step, moved in cases(config, n, dtype, device):
            steps = {}
            for provider, op in providers(name, reference, fused_op, device, not args.no_compile, liger):
                inputs = make_inputs()
                steps[provider] = lambda op=op, inputs=inputs, step=step: step(op, *inputs)
                try:
                    steps[provider]()  # a provider that cannot run this case is reported, not fatal
                except Exception as error:
                    del steps[provider]
                    rows.append(dict(shape=preset, tokens=n, operation=name, provider=provider, error=repr(error)))
                    print(f"{preset:<12}{name:<22}{provider:<15}  failed: {error!r:.60}")
            seconds = median_seconds(steps, device, args.repeats)
            for provider, run in steps.items():
                row = dict(
                    shape=preset,
                    tokens=n,
                    operation=name,
                    provider=provider,
                    ms=seconds[provider] * 1e3,
                    speedup=seconds["torch"] / seconds[provider],
                    gb_s=None if moved is None else moved / seconds[provider] / 1e9,
                    saved_bytes=saved_bytes(run),
                    peak_bytes=peak_bytes(run, device),
                )
                rows.append(row)
                gb_s = "-" if row["gb_s"] is None else f"{row['gb_s']:.1f}"
                print(
                    f"{preset:<12}{name:<22}{provider:<15}{row['ms']:>10.2f}{row['speedup']:>9.2f}{gb_s:>8}"
                    f"{mib(row['saved_bytes']):>11}{mib(row['peak_bytes']):>10}"
                )
    path = write_json(
        f"kernels-{device.type}.json",
        dict(
            device=machine(device),
            dtype=str(dtype),
            repeats=args.repeats,
            torch=torch.__version__,
            command=" ".join(["python", "benchmarks/kernels.py", *sys.argv[1:]]),
            rows=rows,
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
