"""What a run's model needs on a device, worked out before the peer trains: `starling-peer --plan`.

The figures come from the model itself, built on fake tensors (no memory is allocated, so a
Mistral 7B plan takes seconds on any machine): the bytes of the parameters, of their gradients and
of the optimizer state, and the bytes autograd keeps for the backward pass per sequence of the
run's length. The peak of a training step is the fixed part plus, per sequence of the micro-batch,
what autograd keeps and twice the float32 logits (the loss's softmax and its gradient live at once
in the backward pass). Measured on CPU against the profiler's memory timeline of real steps, that
is 3-14% above the peak and never below (tests/peer/test_memory_plan.py). Activations are counted
in float32: under bf16 or fp16 autocast most are half as large, so there the plan errs high.

A distilling peer adds a teacher beside the model (its parameters, in the precision it runs in) or reads the teacher's
top-k from its data, and either way the loss keeps more vocabulary-sized tensors per sequence
(DISTILLATION_LOGITS).

Where each part lives follows the run: in batch mode hivemind keeps gradient accumulators beside
the gradients and, with offload_optimizer (the default), the optimizer's state and a float32 copy
of the parameters in host memory; in DiLoCo mode the inner optimizer's state is on the device and
the outer state (round-start parameters, momentum) in host memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from model import CausalLM, ModelConfig
from model.adapters import checkpoint_config
from peer.optimizer import INNER_OPTIMIZERS
from peer.precision import AUTOCAST_DTYPES
from peer.run_config import RunConfig

FLOAT32 = 4
SAFETY = 0.85  # of the device's memory a plan fills: the rest is the allocator's and the libraries'
MAX_MICRO_BATCH = 256
GIB = 1 << 30
# Float32 [seq_len, vocab] tensors per sequence that a distillation loss adds at the peak of a step,
# beyond the next-token loss's, by what the peer distills from (peer.peer.Peer.teacher_variant's
# kinds), measured with the profiler (5.9-6.0 and 2.9-3.0 on the test's shapes): beside the teacher,
# its logits, both distributions at T and the KL's terms and gradients; from top-k targets, the
# student's distribution at T, its copy without the top-k and their gradient.
DISTILLATION_LOGITS = {"teacher": 6, "top-k": 3}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a peer of this run needs on its device and in host memory, and the micro-batch that fits."""

    device: str
    precision: str  # what the peer trains in (peer.precision.choose_precision)
    device_memory: int | None  # bytes the device has (declared or measured); None: not known (CPU)
    parameters: int  # on the device, float32
    gradients: int  # on the device, with hivemind's accumulators in batch mode
    optimizer_state_on_device: int
    teacher: int  # a distillation teacher's parameters beside the model (in bf16 or fp16 on a GPU), 0 without one
    host: int  # offloaded optimizer state and parameters, averaging buffers, the outer state
    per_sequence: int  # kept for backward, plus the logits' share of the backward pass
    micro_batch: int  # the largest power of two that fits with SAFETY (0: not even one sequence)

    @property
    def fixed(self) -> int:
        """Device bytes that do not grow with the micro-batch."""
        return self.parameters + self.gradients + self.optimizer_state_on_device + self.teacher

    def peak(self, micro_batch: int) -> int:
        """Device bytes at the peak of a training step on `micro_batch` sequences."""
        return self.fixed + micro_batch * self.per_sequence

    @property
    def fits(self) -> bool:
        return self.micro_batch >= 1

    def lines(self) -> list[str]:
        """The plan as a volunteer reads it."""
        memory = "unknown" if self.device_memory is None else f"{self.device_memory / GIB:.1f} GiB"
        lines = [
            f"device: {self.device} ({memory}), precision {self.precision}",
            f"parameters {mib(self.parameters)}, gradients {mib(self.gradients)}, "
            f"optimizer state on the device {mib(self.optimizer_state_on_device)}, in host memory {mib(self.host)}",
            f"per sequence: {mib(self.per_sequence)}",
        ]
        if self.teacher:
            lines.insert(2, f"the teacher beside the model: {mib(self.teacher)}")
        if self.device_memory is None:
            lines.append(f"a step of n sequences peaks at {mib(self.fixed)} + n x {mib(self.per_sequence)}")
        elif self.fits:
            lines.append(f"micro-batch {self.micro_batch}: {mib(self.peak(self.micro_batch))} at the peak of a step")
        return lines


def mib(count: int) -> str:
    return f"{count / (1 << 20):,.0f} MiB"


def per_sequence_bytes(config: ModelConfig, seq_len: int) -> int:
    """What one sequence adds to the peak of a training step: the bytes autograd keeps for the
    backward pass (the parameters excepted), and twice its float32 logits."""
    with FakeTensorMode():
        model = CausalLM(config)
        parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        kept: dict[int, int] = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in parameters:
                kept[storage._cdata] = storage.nbytes()
            return tensor

        tokens = torch.zeros(1, seq_len, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(tokens, labels=tokens)
    return sum(kept.values()) + 2 * seq_len * config.vocab_size * FLOAT32


def parameter_count(config: ModelConfig) -> int:
    with FakeTensorMode():
        return sum(p.numel() for p in CausalLM(config).parameters())


def plan(
    run: RunConfig,
    device: torch.device,
    precision: str,
    device_memory: int | None = None,
    offload: bool | None = None,
    distill_from: str | None = None,
) -> MemoryPlan:
    """The memory plan of a peer of `run` on `device`, training in `precision` (bf16, fp16 or fp32).
    `device_memory`: the bytes it may use (default: a CUDA device's total memory; none on CPU);
    `offload`: the run's offload_optimizer; `distill_from`: in a distillation run, "teacher" (the
    run's objective.teacher beside the model, whose config it reads) or "top-k" (the data's targets)."""
    config = run.model_config()
    count = parameter_count(config)
    optimizer = INNER_OPTIMIZERS[run.training.optimizer]
    state = optimizer.state_bytes * count
    offload = run.averaging.offload_optimizer if offload is None else offload
    if run.training.mode == "diloco":
        # Inner state on the device. In host memory: the outer parameters and momentum, the state
        # averager's own copies of both (peer.diloco.DilocoStateAverager), the pseudo-gradient buffer.
        on_device, gradients, host = state, FLOAT32 * count, 5 * FLOAT32 * count
    else:  # gradients and hivemind's accumulators; the averagers' buffers in host memory
        gradients = 2 * FLOAT32 * count
        on_device = 0 if offload else state
        if offload:  # the state averager averages the offloaded parameters and state in place
            host = FLOAT32 * count + state + 2 * FLOAT32 * count
        else:  # it averages host copies of the parameters and of the averaged statistics
            host = FLOAT32 * count + FLOAT32 * count * (1 + len(optimizer.averaged_statistics))
    if device_memory is None and device.type == "cuda":
        device_memory = torch.cuda.get_device_properties(device).total_memory
    per_sequence = per_sequence_bytes(config, run.data.seq_len)
    teacher = 0
    if distill_from is not None:
        per_sequence += DISTILLATION_LOGITS[distill_from] * run.data.seq_len * config.vocab_size * FLOAT32
    if distill_from == "teacher":  # held in the precision it runs in (peer.peer.Peer._load_teacher)
        value_bytes = 2 if precision in AUTOCAST_DTYPES else FLOAT32
        teacher = value_bytes * parameter_count(checkpoint_config(run.objective.teacher))
    partial = MemoryPlan(
        device=str(device) if device.type != "cuda" else f"{device} {torch.cuda.get_device_name(device)}",
        precision=precision,
        device_memory=device_memory,
        parameters=FLOAT32 * count,
        gradients=gradients,
        optimizer_state_on_device=on_device,
        teacher=teacher,
        host=host,
        per_sequence=per_sequence,
        micro_batch=0,
    )
    return MemoryPlan(**{**asdict(partial), "micro_batch": largest_fitting(partial)})


def largest_fitting(plan_: MemoryPlan) -> int:
    """The largest power-of-two micro-batch whose peak fits SAFETY of the device's memory (up to
    MAX_MICRO_BATCH; that when the memory is not known)."""
    if plan_.device_memory is None:
        return MAX_MICRO_BATCH
    budget = SAFETY * plan_.device_memory
    size = 0
    while size < MAX_MICRO_BATCH and plan_.peak(max(1, 2 * size)) <= budget:
        size = max(1, 2 * size)
    return size
