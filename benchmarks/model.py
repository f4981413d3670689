"""Training throughput and memory of the whole model against transformers' MistralForCausalLM
with the same config and weights (copied with model.from_hf).

    python benchmarks/model.py                  # CPU: our reference path vs transformers (sdpa)
    python benchmarks/model.py --device cuda    # adds kernels="triton"

Each step is forward and backward with labels (the training path). Prints a table and writes
benchmarks/results/model-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, the path starts at benchmarks/, whose model.py and kernels.py would shadow
# the model package and the "kernels" package that transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM  # noqa: E402

from benchmarks.measure import machine, median_seconds, mib, peak_bytes, saved_bytes, write_json  # noqa: E402
from model import ModelConfig, from_hf  # noqa: E402


def hf_config(config: ModelConfig) -> MistralConfig:
    return MistralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        sliding_window=config.sliding_window,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="sdpa",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (e.g. 2 for mistral-7b)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    overrides = {} if args.layers is None else dict(num_hidden_layers=args.layers)
    config = ModelConfig.from_preset(args.preset, **overrides)

    torch.manual_seed(0)
    hf = MistralForCausalLM(hf_config(config)).to(device=device, dtype=dtype).train()
    models = {"transformers": hf}
    for mode in ["torch"] + (["triton"] if device.type == "cuda" else []):
        models[f"starling ({mode})"] = from_hf(hf, kernels=mode).to(device=device, dtype=dtype).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq

    def step(model: torch.nn.Module) -> None:
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    steps = {name: (lambda model=model: step(model)) for name, model in models.items()}
    seconds = median_seconds(steps, device, args.repeats)
    rows = []
    print(f"{'model':<20}{'tokens/s':>12}{'x transformers':>16}{'saved MiB':>11}{'peak MiB':>10}")
    for name, run in steps.items():
        row = dict(
            model=name,
            tokens_per_s=tokens / seconds[name],
            speedup=seconds["transformers"] / seconds[name],
            saved_bytes=saved_bytes(run),
            peak_bytes=peak_bytes(run, device),
        )
        rows.append(row)
        print(
            f"{name:<20}{row['tokens_per_s']:>12.0f}{row['speedup']:>16.2f}{mib(row['saved_bytes']):>11}{mib(row['peak_bytes']):>10}"
        )
    path = write_json(
        f"model-{device.type}.json" if args.dtype is None else f"model-{device.type}-{args.dtype}.json",
        dict(
            device=machine(device),
            dtype=str(dtype),
            preset=args.preset,
            layers=config.num_hidden_layers,
            batch=args.batch,
            seq=args.seq,
            repeats=args.repeats,
            torch=torch.__version__,
            command=" ".join(["python", "benchmarks/model.py", *sys.argv[1:]]),
            rows=rows,
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
