"""The collaborative optimizer: hivemind.Optimizer over the run's inner optimizer and schedule."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.p2p import PeerID

from model import parameter_groups
from peer.averager import CountingGradientAverager, round_epochs
from peer.compression import gradient_compression, state_compression
from peer.faults import FaultPlan
from peer.progress import RunProgressTracker
from peer.run_config import RunConfig, TrainingSection
from peer.state_loading import CheckedStateAverager

logger = logging.getLogger("starling.peer")


def _bitsandbytes_optimizer(name: str) -> type[torch.optim.Optimizer]:
    import bitsandbytes as bnb  # only runs that ask for 8-bit optimizers need it

    return getattr(bnb.optim, name)


@dataclass(frozen=True)
class InnerOptimizer:
    """An optimizer a run config may name."""

    load: Callable[[], type[torch.optim.Optimizer]]
    state_bytes: int  # of optimizer state per parameter
    # The per-parameter statistics that state averaging averages with the parameters. Peers that
    # average gradients exactly take identical steps only while these agree too: averaging the
    # parameters alone left a peer whose Adam moments had drifted (after a partial round or a
    # chain of state loads) stepping 3.5% larger than the others for good. bitsandbytes keeps its
    # moments as 8-bit codes with per-block scales, whose average is not the codes of the average:
    # its peers share their moments only by loading state.
    averaged_statistics: tuple[str, ...] = ()


INNER_OPTIMIZERS: dict[str, InnerOptimizer] = {
    "adamw": InnerOptimizer(lambda: torch.optim.AdamW, state_bytes=8, averaged_statistics=("exp_avg", "exp_avg_sq")),
    "sgd": InnerOptimizer(lambda: torch.optim.SGD, state_bytes=0),  # without momentum: no state
    "adamw8bit": InnerOptimizer(lambda: _bitsandbytes_optimizer("AdamW8bit"), state_bytes=2),
    "lamb8bit": InnerOptimizer(lambda: _bitsandbytes_optimizer("LAMB8bit"), state_bytes=2),
}


def inner_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    return INNER_OPTIMIZERS[name].load()


def with_gradient_clipping(
    optimizer_class: type[torch.optim.Optimizer], max_norm: float
) -> type[torch.optim.Optimizer]:
    """A subclass whose step() first clips the (averaged) gradients to a global norm."""

    class Clipped(optimizer_class):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    Clipped.__name__ = f"Clipped{optimizer_class.__name__}"
    return Clipped


def lr_multiplier(training: TrainingSection) -> Callable[[float], float]:
    """Linear warm-up over warmup_epochs, then cosine decay to a tenth by total_epochs. DiLoCo's
    inner steps ask between epochs (rounds and their fraction done): the warm-up's last epoch is
    at the full rate, never above it."""

    def multiplier(epoch: float) -> float:
        if epoch < training.warmup_epochs:
            return min(1.0, (epoch + 1) / training.warmup_epochs)
        progress = min(1.0, (epoch - training.warmup_epochs) / max(1, training.total_epochs - training.warmup_epochs))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def make_inner_optimizer(params: Iterable, training: TrainingSection) -> torch.optim.Optimizer:
    """The run's optimizer over `params`: tensors, grouped here so that only matrices are decayed
    (model.parameter_groups), or groups made so already (hivemind passes on those it was given)."""
    params = list(params)
    if params and isinstance(params[0], torch.Tensor):
        params = parameter_groups(params, training.weight_decay)
    optimizer_class = with_gradient_clipping(inner_optimizer_class(training.optimizer), training.max_grad_norm)
    if training.optimizer == "sgd":  # plain SGD: no momentum (betas do not apply)
        return optimizer_class(params, lr=training.lr, weight_decay=training.weight_decay)
    return optimizer_class(params, lr=training.lr, betas=tuple(training.betas), weight_decay=training.weight_decay)


def outer_optimizer(params: Iterable, run: RunConfig) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum (plain SGD when the momentum is 0)."""
    momentum = run.diloco.outer_momentum
    return torch.optim.SGD(params, lr=run.diloco.outer_lr, momentum=momentum, nesterov=momentum > 0)


def averaged_statistics(run: RunConfig) -> tuple[str, ...]:
    """The state optimizer's statistics that state averaging rounds average with the parameters:
    the inner optimizer's in batch mode (INNER_OPTIMIZERS), the outer momentum in DiLoCo mode."""
    if run.training.mode == "diloco":
        return ("momentum_buffer",) if run.diloco.outer_momentum > 0 else ()
    return INNER_OPTIMIZERS[run.training.optimizer].averaged_statistics


def make_state_optimizer(params: Iterable, run: RunConfig) -> torch.optim.Optimizer:
    """The optimizer whose state the swarm shares (hivemind's state averager holds it): the run's
    optimizer in batch mode, the outer optimizer in DiLoCo mode (peer.diloco)."""
    if run.training.mode == "diloco":
        return outer_optimizer(params, run)
    return make_inner_optimizer(params, run.training)


def make_state_scheduler(
    optimizer: torch.optim.Optimizer, run: RunConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule by epoch of the state optimizer: none for DiLoCo's outer steps."""
    if run.training.mode == "diloco":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(run.training))


class CollaborativeOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that checks the state it loads from other peers (CheckedStateAverager) and
    leaves the peers whose state it refused out of the run's progress (RunProgressTracker)."""

    tracker: RunProgressTracker
    state_averager: CheckedStateAverager
    state_averager_class: type[CheckedStateAverager] = CheckedStateAverager
    # Called with (peer id, problem) once for each donor whose state a load refused.
    on_state_refused: Callable[[str, str], None] | None = None
    _refusals_reported: frozenset[bytes] = frozenset()

    def _make_state_averager(self, **kwargs) -> CheckedStateAverager:
        # hivemind.Optimizer's own settings for its TrainingStateAverager
        return self.state_averager_class(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _make_gradient_averager(self, factory, **kwargs):
        averager = super()._make_gradient_averager(factory, **kwargs)
        if isinstance(averager, CountingGradientAverager):
            averager.round_epoch = lambda: self.local_epoch
        return averager

    def _update_global_epoch(self, grad_scaler) -> None:
        """hivemind's epoch step, after a fresh look at the run's progress when it counts no other
        peer: it then steps alone on its own gradients, and the progress it holds may be a refresh
        period old (peers started together each take their first epoch alone by it, and in DiLoCo
        mode keep different outer parameters from then on). When that look finds the run more than
        an epoch ahead (a peer whose link came back), the peer loads the run's state instead, as
        hivemind's step does at its start: hivemind's epoch step would take the run's epoch number
        with this peer's own parameters."""
        if self.tracker.global_progress.num_peers <= 1 and not self.auxiliary:
            self.tracker.fetch_now()
            if not self.is_synchronized_with_peers():
                logger.info(
                    "the run is at epoch %d, this peer at %d: loading its state",
                    self.tracker.global_epoch,
                    self.local_epoch,
                )
                self.load_state_from_peers()
                return
        super()._update_global_epoch(grad_scaler)

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control: StepControl | None) -> None:
        """hivemind's gradient round, after which a peer behind the group it averaged with takes the
        group's epoch. hivemind next decides whether the epoch ends with a state round from this
        peer's epoch; a peer an epoch behind its group (a joiner whose state was an epoch old)
        decided for another epoch than the group and ran a state round nobody joined, or left the
        group's to run alone: each held a two-peer swarm for the averaging timeout. With delayed
        gradient averaging (DiLoCo's overlap) the round ends after that decision, and the peer
        takes the group's epoch after its step (catch_up_with_group)."""
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if self.delay_grad_averaging or maybe_step_control is None or not maybe_step_control.done():
            return
        epochs = round_epochs(maybe_step_control, self.grad_averager.peer_id)
        if epochs is not None and epochs.group > self.local_epoch:
            self._take_epoch(epochs.group)  # hivemind's epoch step holds the tracker (pause_updates)

    def catch_up_with_group(self, epoch: int) -> None:
        """Take `epoch`, the one the group of the latest round moved to, if this peer is behind it:
        they averaged the same values, only their epochs differ (a peer that took its first epoch
        after the others would keep its count behind theirs, and stop or take its schedule a round
        apart from them)."""
        if epoch <= self.local_epoch:
            return
        with self.tracker.pause_updates():
            self._take_epoch(epoch)
            self.tracker.update_epoch(new_epoch=self.local_epoch)
        if not self.client_mode:
            self.state_averager.state_sharing_priority = self.local_epoch
            self.grad_averager.state_sharing_priority = self.local_epoch

    def _take_epoch(self, epoch: int) -> None:
        logger.info("the group of the last round was at epoch %d: taking it", epoch)
        self.state_averager.take_epoch_without_state(epoch)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> RunProgressTracker:
        return RunProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            counts_itself=not self.auxiliary,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            **kwargs,
        )

    def load_state_from_peers(self, **kwargs) -> bool:
        """hivemind.Optimizer's load (keyword arguments go to CheckedStateAverager's); returns whether
        a state was applied, and leaves donors refused so far out of the run's progress."""
        received = self.state_averager.states_received
        super().load_state_from_peers(**kwargs)
        refused = self.state_averager.refused_donors()
        self.tracker.ignore_peers(refused)
        for donor in refused.keys() - self._refusals_reported:
            if self.on_state_refused is not None:
                self.on_state_refused(str(PeerID(donor)), refused[donor])
        self._refusals_reported = frozenset(refused)
        return self.state_averager.states_received > received

    def tag_along_scheduled_round(self) -> int | None:
        """Go through the gradient round this peer has scheduled with zero weight, as hivemind's
        load_state_from_peers does before loading (its group would otherwise look for a new one),
        and return the epoch that round's group steps to: a state loaded after that round must be of
        that epoch, or this peer is a step behind again. None without such a round."""
        control, self.scheduled_grads = self.scheduled_grads, None
        if control is None:
            return None
        if not control.done():
            without_weight(control)
            try:
                control.result(self.averaging_timeout)
            except BaseException:  # a timeout or the round's failure: there is no group epoch to take
                control.cancel()
        epochs = round_epochs(control, self.grad_averager.peer_id)
        return None if epochs is None else epochs.group + 1

    def _scheduled_rounds(self) -> list[StepControl]:
        return [
            control
            for control in (self.scheduled_grads, self.scheduled_state)
            if control is not None and not control.done()
        ]

    def leave_matchmaking(self) -> None:
        """Cancel the rounds still looking for a group; safe from another thread. A stopping peer
        calls it at once: the step it is in may be waiting on that matchmaking for the whole
        averaging timeout, while the partners it looks for are leaving too."""
        for control in self._scheduled_rounds():
            if control.stage == AveragingStage.LOOKING_FOR_GROUP:
                control.cancel()

    def shutdown(self) -> None:
        """hivemind's shutdown, with a bounded goodbye: in a round whose group is formed this peer
        still sends its parts (with weight 0, so the group's average is the others'), but waits for
        the round only as long as one part may take, not the averaging timeout. When the whole group
        leaves at once, the parts it waits for never come."""
        self.leave_matchmaking()
        deadline = time.monotonic() + self.next_chunk_timeout
        for control in self._scheduled_rounds():
            without_weight(control)
        for control in self._scheduled_rounds():
            try:
                control.result(max(0.0, deadline - time.monotonic()))
            except BaseException:  # a timeout or the round's failure: this peer leaves either way
                control.cancel()
        super().shutdown()


def without_weight(control: StepControl) -> None:
    """Let a scheduled round go on with this peer's parts but none of its values (weight 0), if it
    has not been triggered with them yet."""
    if not control.triggered:
        control.weight = 0
        control.allow_allreduce()


def make_collaborative_optimizer(
    model: torch.nn.Module,
    dht: hivemind.DHT,
    run: RunConfig,
    batch_size_per_step: int | None,
    auxiliary: bool = False,
    verbose: bool = False,
    faults: FaultPlan | None = None,
) -> CollaborativeOptimizer:
    """The collaborative optimizer for this run. In batch mode gradients accumulate toward
    target_batch_size, are averaged with the run's compression, and every peer takes the same
    optimizer step each epoch; in DiLoCo mode, see peer.diloco. `faults`: those a test declares for
    this peer's gradient averager (peer.faults)."""
    if run.training.mode == "diloco":
        from peer.diloco import make_diloco_optimizer  # peer.diloco builds on this module

        return make_diloco_optimizer(
            model, dht, run, batch_size_per_step, auxiliary=auxiliary, verbose=verbose, faults=faults
        )
    averaging = run.averaging
    return CollaborativeOptimizer(
        # grouped before hivemind sees them: its state averager needs the optimizer's groups as given
        params=parameter_groups(model.parameters(), run.training.weight_decay),
        optimizer=partial(make_state_optimizer, run=run),
        scheduler=partial(make_state_scheduler, run=run),
        target_batch_size=run.training.target_batch_size,
        offload_optimizer=averaging.offload_optimizer,
        delay_optimizer_step=averaging.delay_optimizer_step,
        grad_compression=gradient_compression(averaging),
        average_opt_statistics=averaged_statistics(run),
        grad_averager_factory=partial(
            CountingGradientAverager,
            aggregation=averaging.aggregation,
            **averaging.matchmaking_options(dht.peer_id.to_bytes()),
            faults=faults,
        ),
        **swarm_options(dht, run, batch_size_per_step, auxiliary, verbose),
    )


def swarm_options(
    dht: hivemind.DHT, run: RunConfig, batch_size_per_step: int | None, auxiliary: bool, verbose: bool
) -> dict:
    """hivemind.Optimizer's settings that both modes share: the records, timeouts, state averaging."""
    averaging = run.averaging
    return dict(
        dht=dht,
        run_id=run.training_key(),  # averaging and progress records: only peers of this configuration
        batch_size_per_step=None if auxiliary else batch_size_per_step,
        matchmaking_time=averaging.matchmaking_time,
        averaging_timeout=averaging.averaging_timeout,
        next_chunk_timeout=averaging.part_timeout,
        average_state_every=averaging.average_state_every,
        averager_opts=averaging.matchmaking_options(dht.peer_id.to_bytes()),  # the state averager's
        state_averaging_compression=state_compression(),
        load_state_compression=state_compression(),
        # hivemind.Optimizer replaces any non-None client_mode with the DHT's own.
        client_mode=dht.client_mode,
        auxiliary=auxiliary,
        # The run's progress is read at least every record period (peer.progress.RecordPeriod; up to
        # every 0.2 s near an epoch's end), and a peer's record stored at most that often: the
        # readers extrapolate in between.
        tracker_opts=dict(min_refresh_period=0.2, default_refresh_period=1.0),
        verbose=verbose,
    )
