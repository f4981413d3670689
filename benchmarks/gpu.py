"""Everything to measure on a CUDA machine, in one command: `python benchmarks/gpu.py`.

1. the Triton kernels against eager PyTorch and torch.compile (benchmarks/kernels.py --device cuda);
2. the model's training throughput and memory against transformers, in bf16 and fp16
   (benchmarks/model.py --device cuda --dtype ...);
3. what each training objective costs (benchmarks/objectives.py --device cuda: pretraining, SFT,
   distillation from a teacher or from its top-16 log-probs);
4. the memory plan (peer.memory_plan) against the peak memory CUDA measures in a real training
   step, for the tiny and demo presets, in each precision the device runs;
5. a peer smoke test: an offline peer of the tiny model trains a few epochs in each precision
   (starling-peer --config ... --device cuda --precision ...), and its summary is kept.
Each part writes its JSON under benchmarks/results/ (gpu-plan-<device>.json and
gpu-peer-<device>.json for the last two) and a failing part does not stop the others. On a machine
without CUDA it says so in one line and exits with status 1. Nothing is installed: it runs with the
environment `make setup` made.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repository, not benchmarks/ (whose model.py would shadow the package)

import torch  # noqa: E402

from benchmarks.measure import write_json  # noqa: E402

PLAN_CASES = (("tiny", 128, 8), ("demo", 256, 4))  # preset, sequence length, micro-batch


def precisions() -> list[str]:
    return ["bf16", "fp16"] if torch.cuda.is_bf16_supported(including_emulation=False) else ["fp16"]


def run_part(name: str, command: list[str], timeout: float) -> dict:
    """Run one part; its outcome (exit status and the end of its output) for the summary."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(part=name, status="timed out", seconds=timeout)
    print(done.stdout[-4000:], done.stderr[-2000:] if done.returncode else "", sep="", flush=True)
    return dict(part=name, status=done.returncode, tail=(done.stdout + done.stderr)[-2000:])


def plan_against_peak(device: torch.device) -> list[dict]:
    """The plan's peak for a micro-batch beside CUDA's measured peak of one training step."""
    from model import CausalLM
    from peer.memory_plan import plan
    from peer.optimizer import make_inner_optimizer
    from peer.precision import MixedPrecision
    from peer.run_config import RunConfig

    rows = []
    for preset, seq_len, micro_batch in PLAN_CASES:
        for precision in precisions():
            # As tests/peer/test_memory_plan.py measures on CPU: a DiLoCo peer's inner step, on the device.
            run = RunConfig.from_dict(
                {"model": {"preset": preset}, "data": {"seq_len": seq_len}, "training": {"mode": "diloco"}}
            )
            planned = plan(run, device, precision).peak(micro_batch)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            model = CausalLM(run.model_config()).to(device)
            optimizer = make_inner_optimizer(model.parameters(), run.training)
            mixed = MixedPrecision(precision, device)
            batch = torch.randint(0, run.model_config().vocab_size, (micro_batch, seq_len), device=device)
            for _ in range(2):  # the second step has the optimizer state
                with mixed.autocast():
                    loss = model(batch, labels=batch).loss
                mixed.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
            torch.cuda.synchronize(device)
            measured = torch.cuda.max_memory_allocated(device)
            rows.append(
                dict(
                    preset=preset,
                    precision=precision,
                    seq_len=seq_len,
                    micro_batch=micro_batch,
                    planned=planned,
                    measured=measured,
                    ratio=planned / measured,
                )
            )
            print(f"plan {preset} {precision}: planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
            del model, optimizer, batch
    return rows


def peer_smoke(device: torch.device, epochs: int) -> list[dict]:
    """An offline peer of the tiny model, a few epochs in each precision: its summary."""
    from coordinator.harness import LOOPBACK_MADDR, HarnessError, PeerProcess

    rows = []
    for precision in precisions():
        with tempfile.TemporaryDirectory() as folder:
            run_toml = Path(folder) / "run.toml"
            run_toml.write_text('run_id = "gpu-smoke"\n[model]\npreset = "tiny"\n[training]\ntarget_batch_size = 64\n')
            arguments = [
                *("--config", str(run_toml), "--device", str(device), "--precision", precision),
                *("--max-epochs", str(epochs), "--host-maddrs", LOOPBACK_MADDR),
            ]
            print(f"== peer {precision}: starling-peer {' '.join(arguments)}", flush=True)
            peer = PeerProcess.command_line(Path(folder) / "peer", arguments)
            try:
                summary = peer.wait(timeout=600)  # its "stopped" event
            except HarnessError:  # failed or still running: its status says which
                summary = None
            status = peer.process.poll()
            peer.kill()
            print(peer.log_tail(4000), flush=True)
            rows.append(dict(precision=precision, status="timed out" if status is None else status, summary=summary))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=5, help="of the peer smoke test")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine: nothing to measure", file=sys.stderr)
        sys.exit(1)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device).replace(" ", "-").lower()
    python = sys.executable
    parts = [run_part("kernels", [python, "benchmarks/kernels.py", "--device", str(device)], timeout=900)]
    for precision in precisions():
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
        command = [python, "benchmarks/model.py", "--device", str(device), "--dtype", dtype]
        parts.append(run_part(f"model {precision}", command, timeout=900))
    parts.append(run_part("objectives", [python, "benchmarks/objectives.py", "--device", str(device)], timeout=900))
    try:
        write_json(f"gpu-plan-{name}.json", dict(device=name, rows=plan_against_peak(device)))
        parts.append(dict(part="plan", status=0))
    except Exception as error:  # the other parts still run
        parts.append(dict(part="plan", status=repr(error)))
    write_json(f"gpu-peer-{name}.json", dict(device=name, rows=peer_smoke(device, args.epochs)))
    print(json.dumps([{key: part[key] for key in ("part", "status")} for part in parts]))


if __name__ == "__main__":
    main()
