"""DiLoCo mode: each peer takes local inner steps; every round, the swarm averages its pseudo-gradients
and every peer takes the same outer step.

It runs on hivemind.Optimizer's machinery with the roles of its parts changed:
- the outer state (the round-start parameters and the Nesterov momentum) is hivemind's offloaded
  optimizer: float32 copies of the parameters on the CPU, stepped by the outer SGD;
- the gradient averager (PseudoGradientAverager) averages, weighted by samples, the pseudo-gradients
  round-start parameters minus the model's parameters, in the buffers that are the outer
  parameters' .grad, with the run's aggregation and codec (and error feedback);
- the epoch is the round: it ends when the swarm has processed samples_per_round; hivemind's
  progress tracker, matchmaking pre-scheduling, state averaging and state loading work unchanged;
- the inner optimizer (the run's [training] optimizer) steps the model's parameters after every
  inner_batch_size samples. After the outer step hivemind copies the outer parameters into the
  model's, and the next round starts from them.

With [diloco] overlap, hivemind's delayed optimizer step does the averaging and the outer step in
the background while the model trains on: the next round's inner steps start from this peer's own
parameters at the round's end, and once the outer step is done the model moves by what it changed
(outer parameters minus those round-end parameters), keeping the inner progress made meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import hivemind
import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression, deserialize_torch_tensor

from peer.averager import CountingGradientAverager
from peer.compression import pseudo_gradient_compression
from peer.faults import FaultPlan
from peer.optimizer import (
    CollaborativeOptimizer,
    averaged_statistics,
    lr_multiplier,
    make_inner_optimizer,
    make_state_optimizer,
    swarm_options,
)
from peer.run_config import RunConfig
from peer.state_loading import CheckedStateAverager

logger = logging.getLogger("starling.peer")


class ErrorFeedback:
    """What a lossy codec did not send of each tensor, added to the tensor of the next round.

    encode_() replaces the tensors by exactly what hivemind's all-reduce will send of them (each
    part through the codec, split as hivemind splits it) and keeps target - sent as pending;
    commit() makes the pending residual the one the next encode_() adds. Encoding again before
    commit() starts from the same residual, so a round hivemind loads twice (a failed all-reduce
    falls back to the local values) is encoded once."""

    def __init__(self, compression: CompressionBase, part_size_bytes: int = DEFAULT_PART_SIZE_BYTES) -> None:
        self.compression, self.part_size_bytes = compression, part_size_bytes
        self.residuals: list[torch.Tensor] | None = None
        self._pending: list[torch.Tensor] | None = None

    @torch.no_grad()
    def encode_(self, tensors: list[torch.Tensor]) -> None:
        pending = []
        for index, tensor in enumerate(tensors):
            target = tensor.float() + (self.residuals[index] if self.residuals is not None else 0.0)
            tensor.copy_(self.round_trip(target, index))
            pending.append(target - tensor.float())
        self._pending = pending

    def commit(self) -> None:
        if self._pending is not None:
            self.residuals, self._pending = self._pending, None

    def reset(self) -> None:
        """Forget the residual: the parameters it belonged to were replaced (a state load)."""
        self.residuals = self._pending = None

    def round_trip(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """The values the all-reduce sends of tensor `index`: hivemind's TensorPartContainer cuts
        each tensor into parts of part_size_bytes after compression and compresses each alone."""
        info = CompressionInfo.from_tensor(tensor, key=index)
        part_values = int(
            self.part_size_bytes / (tensor.element_size() * self.compression.estimate_compression_ratio(info))
        )
        parts = [
            deserialize_torch_tensor(self.compression.compress(part, info.get_part(i, part_values)))
            for i, part in enumerate(tensor.reshape(-1).split(part_values))
        ]
        return torch.cat(parts).view_as(tensor)


class PseudoGradientAverager(CountingGradientAverager):
    """The gradient averager of DiLoCo mode: what it averages is the pseudo-gradient, the outer
    parameters (`anchors`, set by DilocoOptimizer) minus the model's, weighted by the samples this
    peer processed in the round; the model's gradients themselves stay with the inner optimizer."""

    def __init__(
        self, *args, error_feedback: ErrorFeedback | None = None, keep_round_end: bool = False, **kwargs
    ) -> None:
        # reuse_grad_buffers: no accumulators of its own (the gradients are the inner optimizer's)
        kwargs["reuse_grad_buffers"] = True
        super().__init__(*args, **kwargs)
        self.anchors: list[torch.Tensor] = []
        self.error_feedback = error_feedback
        # Overlap: the model's parameters when the round's pseudo-gradient was taken (float32, beside
        # the anchors), until the outer step that averaged it is applied (DilocoStateAverager).
        self.keep_round_end = keep_round_end
        self.round_end: list[torch.Tensor] | None = None

    def accumulate_grads_(self, batch_size: int) -> None:
        """Count the samples of a micro-batch (the averaging weight); the inner step took its gradient."""
        self.local_samples_accumulated += batch_size
        self.local_times_accumulated += 1

    @torch.no_grad()
    def load_accumulators_into_averager_(self) -> None:
        """Put this round's pseudo-gradient in the averager's buffers (through error feedback). With
        overlap, a failed all-reduce loads it again in the background while the model trains on: it
        is taken from the round-end parameters kept at the first load, not from the model."""
        if self.keep_round_end and self.round_end is None:
            self.round_end = [
                p.detach().to(a.device, a.dtype, copy=True) for a, p in zip(self.anchors, self.parameters)
            ]
        ends = self.round_end if self.keep_round_end else [p.detach() for p in self.parameters]
        with self.get_tensors() as buffers:
            for buffer, anchor, end in zip(buffers, self.anchors, ends):
                torch.sub(anchor, end.to(anchor.device, anchor.dtype), out=buffer)
            if self.error_feedback is not None:
                self.error_feedback.encode_(list(buffers))

    def step(self, *args, reset_accumulators: bool = True, **kwargs):
        # hivemind.Optimizer resets the sample count after the round (reset_accumulated_grads_)
        return super().step(*args, reset_accumulators=False, **kwargs)

    def reset_accumulated_grads_(self) -> None:
        """The round is over: its samples are counted, and its error-feedback residual kept."""
        self._accumulators_used_in_step = False
        self.local_samples_accumulated = self.local_times_accumulated = 0
        if self.error_feedback is not None:
            self.error_feedback.commit()


class DilocoStateAverager(CheckedStateAverager):
    """The state averager of DiLoCo mode. hivemind applies a state averaging round that finished in
    the background at the next step, by copying the averaged (outer) parameters into the model's;
    in DiLoCo mode these hold the round's inner progress by then, so the model's parameters move by
    what the averaging changed in the outer ones instead. With overlap, an outer step done in the
    background moves them by the outer parameters minus the round-end parameters it started from.

    The outer state is averaged in buffers of its own, not in place (hivemind's default with an
    offloaded optimizer), so that a round is applied through _apply_averaging_results_ below: in
    place, hivemind copied the outer parameters into the model, erasing the inner steps taken since.
    A round's result is then copied over the outer state when applied, so an outer step waits for a
    round still under way and takes its result first (after it, the round's older state would
    replace that step's); and a round that never loaded this peer's state applies nothing (the
    buffers hold an older round's)."""

    _model_moved = False
    _buffers_loaded = False  # the buffers hold this peer's state as the latest round took it
    pseudo_gradients: PseudoGradientAverager | None = None  # set by DilocoOptimizer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, reuse_tensors=False, **kwargs)

    def step(self, *args, optimizer_step: bool = False, wait_for_delayed_updates: bool | None = None, **kwargs):
        if optimizer_step and wait_for_delayed_updates is None:
            wait_for_delayed_updates = True
        return super().step(
            *args, optimizer_step=optimizer_step, wait_for_delayed_updates=wait_for_delayed_updates, **kwargs
        )

    def _load_local_tensors_into_averager_(self) -> None:
        super()._load_local_tensors_into_averager_()
        self._buffers_loaded = True

    def outer_parameters(self) -> list[torch.Tensor]:
        """The outer optimizer's parameters: the round's anchors, on the CPU in float32."""
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def _move_model_(self, new: list[torch.Tensor], old: list[torch.Tensor]) -> None:
        for model_param, after, before in zip(self.main_parameters, new, old):
            model_param.add_((after - before).to(model_param.device, model_param.dtype))

    @torch.no_grad()
    def _apply_averaging_results_(self) -> None:
        if not self._buffers_loaded:
            return
        self._buffers_loaded = False
        pending_round = self.pseudo_gradients is not None and self.pseudo_gradients.round_end is not None
        if not self.finished_averaging_round.is_set() or pending_round:
            # awaited right after the outer step, or averaged after an outer step not applied yet
            # (whose move of the model takes this in): the outer parameters only, as usual
            return super()._apply_averaging_results_()
        before = [param.detach().clone() for param in self.outer_parameters()]
        super()._apply_averaging_results_()
        self._move_model_(self.outer_parameters(), before)
        self._model_moved = True

    @torch.no_grad()
    def _enter_group_state(self) -> None:
        """The next round starts from the outer parameters the state round gave, as after an outer step."""
        for model_param, outer in zip(self.main_parameters, self.outer_parameters()):
            model_param.copy_(outer.to(model_param.device, model_param.dtype))
        self._model_moved = False

    @torch.no_grad()
    def _apply_optimizer_parameters_(self) -> None:
        round_end = self.pseudo_gradients.round_end if self.pseudo_gradients is not None else None
        if round_end is not None:  # overlap: the outer step of a round the model has trained past
            self._move_model_(self.outer_parameters(), round_end)
            self.pseudo_gradients.round_end = None
            self._model_moved = False
            return
        if self._model_moved:  # hivemind's copy that follows background averaging results: already moved
            self._model_moved = False
            return
        super()._apply_optimizer_parameters_()


class DilocoOptimizer(CollaborativeOptimizer):
    """hivemind.Optimizer in DiLoCo mode (see the module docstring). `step(batch_size=...)` after each
    micro-batch's backward: the gradients accumulate until inner_batch_size samples, then the inner
    optimizer steps. zero_grad() clears them only once an inner step has used them."""

    grad_averager: PseudoGradientAverager
    state_averager_class = DilocoStateAverager

    def __init__(self, *args, inner_optimizer: torch.optim.Optimizer, run: RunConfig, **kwargs) -> None:
        self.inner_optimizer = inner_optimizer
        self.inner_lr = [group["lr"] for group in inner_optimizer.param_groups]
        self.lr_multiplier = lr_multiplier(run.training)
        self.inner_batch_size = run.diloco.inner_batch_size
        self.samples_per_round = run.diloco.samples_per_round
        self.inner_steps = 0  # since this peer started
        self.before_outer_step: Callable[[], None] | None = None  # called once the round's inner steps are over
        self._inner_samples = self._inner_micro_batches = 0  # in .grad, not stepped yet
        super().__init__(*args, **kwargs)

    def _make_gradient_averager(self, factory, **kwargs) -> PseudoGradientAverager:
        averager = super()._make_gradient_averager(factory, **kwargs)
        averager.anchors = self.state_averager.outer_parameters()
        self.state_averager.pseudo_gradients = averager
        return averager

    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler) -> bool:
        self._inner_samples += batch_size
        self._inner_micro_batches += 1
        if self._inner_samples >= self.inner_batch_size:
            self._inner_step()
        self.grad_averager.accumulate_grads_(batch_size)
        self.tracker.report_local_progress(self.local_epoch, self.grad_averager.local_samples_accumulated)
        return True

    def _update_global_epoch(self, grad_scaler) -> None:
        if self._inner_samples:  # the round's last micro-batches count: step on them before the round ends
            self._inner_step()
        if self.before_outer_step is not None:
            self.before_outer_step()
        super()._update_global_epoch(grad_scaler)

    @torch.no_grad()
    def _inner_step(self) -> None:
        """One step of the inner optimizer on the mean gradient of the micro-batches since the last,
        at the schedule's learning rate for the swarm's progress (rounds, and this round's fraction)."""
        params = [p for group in self.inner_optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self._inner_micro_batches > 1:
            torch._foreach_div_([p.grad for p in params], float(self._inner_micro_batches))
        progress = self.tracker.global_progress.samples_accumulated / self.samples_per_round
        multiplier = self.lr_multiplier(self.local_epoch + min(1.0, progress))
        for group, lr in zip(self.inner_optimizer.param_groups, self.inner_lr):
            group["lr"] = lr * multiplier
        with torch.enable_grad():
            self.inner_optimizer.step()
        self.inner_steps += 1
        self._inner_samples = self._inner_micro_batches = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._inner_samples == 0:
            self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    def load_state_from_peers(self, **kwargs) -> bool:
        """CollaborativeOptimizer's load; the model then holds the loaded outer parameters, and
        what this peer accumulated or had not sent belonged to the parameters it replaced."""
        applied = super().load_state_from_peers(**kwargs)
        if applied:
            self.inner_optimizer.zero_grad(set_to_none=True)
            self._inner_samples = self._inner_micro_batches = 0
            self.grad_averager.round_end = None  # the model now holds the loaded outer parameters
            if self.grad_averager.error_feedback is not None:
                self.grad_averager.error_feedback.reset()
        return applied


def make_diloco_optimizer(
    model: torch.nn.Module,
    dht: hivemind.DHT,
    run: RunConfig,
    batch_size_per_step: int | None,
    auxiliary: bool = False,
    verbose: bool = False,
    faults: FaultPlan | None = None,
) -> DilocoOptimizer:
    """The collaborative optimizer of a DiLoCo-mode run (see the module docstring)."""
    averaging, diloco = run.averaging, run.diloco
    compression = pseudo_gradient_compression(diloco, averaging)
    lossy = not isinstance(compression, NoCompression)
    error_feedback = ErrorFeedback(compression) if diloco.error_feedback and lossy and not auxiliary else None
    overlap = diloco.overlap and not auxiliary
    return DilocoOptimizer(
        inner_optimizer=make_inner_optimizer(model.parameters(), run.training),
        run=run,
        params=model.parameters(),
        optimizer=partial(make_state_optimizer, run=run),
        target_batch_size=run.samples_per_epoch,
        offload_optimizer=True,  # the outer state lives on the CPU, in float32
        delay_optimizer_step=overlap,
        delay_grad_averaging=overlap,
        grad_compression=compression,
        average_opt_statistics=averaged_statistics(run),
        grad_averager_factory=partial(
            PseudoGradientAverager,
            aggregation=averaging.aggregation,
            **averaging.matchmaking_options(dht.peer_id.to_bytes()),
            error_feedback=error_feedback,
            keep_round_end=overlap,
            faults=faults,
        ),
        **swarm_options(dht, run, batch_size_per_step, auxiliary, verbose),
    )
