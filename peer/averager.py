"""Starling's averagers: hivemind's with robust aggregation, and the gradient averager counting how its rounds end."""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import enum
import logging
import multiprocessing
import multiprocessing.sharedctypes
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import AsyncIterator, NamedTuple  # noqa: UP035  (hivemind's servicer reads typing's stream hints, not collections.abc's)

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.optim.grad_averager import GradientAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip
from hivemind.utils.timed_storage import get_dht_time

from model.kernels import guard as kernel_guard
from peer import hivemind_fixes
from peer.faults import FaultPlan
from peer.robust import CenteredClipAllReduceRunner

hivemind_fixes.apply()  # every process that averages imports this module

logger = logging.getLogger("starling.peer")

# When the averaging step running in this task began looking for a group (time.monotonic(), in the
# averager's process; a pre-scheduled round begins before the peer's epoch ends).
_looking_since: contextvars.ContextVar[float] = contextvars.ContextVar("looking_since")


class ReducerFailures:
    """Mixed into an AllReduceRunner: keeps why each reducer that failed this peer failed (hivemind
    fills its parts with the peer's own values and logs the reason at debug level only), warns
    when this peer, as a reducer, stops reducing a sender's parts on an error, and adds the bytes
    of every message it sends (parts as a member, averages as a reducer) to `bytes_sent`."""

    def __init__(self, *args, bytes_sent: multiprocessing.sharedctypes.Synchronized | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reducer_failures: dict[str, str] = {}  # reducer peer id -> the error
        self.bytes_sent = bytes_sent

    def _count(self, message: averaging_pb2.AveragingData) -> None:
        if self.bytes_sent is not None:
            with self.bytes_sent.get_lock():
                self.bytes_sent.value += message.ByteSize()

    async def _generate_input_for_peer(self, peer_index: int):
        async for message in super()._generate_input_for_peer(peer_index):
            self._count(message)
            yield message

    async def _communicate_with_peer(self, peer_id) -> None:
        try:
            await super()._communicate_with_peer(peer_id)
        except BaseException as error:  # a cancellation fails the reducer's remaining parts too
            self.reducer_failures[str(peer_id)] = repr(error)
            raise

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        sender, sent = self.sender_peer_ids[sender_index], 0
        try:
            async for message in super()._accumulate_parts_streaming(stream, sender_index):
                self._count(message)
                yield message
                sent += 1
        except Exception as error:  # hivemind answers INTERNAL_ERROR and logs why at debug level only
            logger.warning("stopped reducing the parts of %s: %r", sender, error)
            raise
        expected = self.tensor_part_reducer.num_parts
        if sent < expected:  # hivemind ends the stream quietly: the sender will count a partial round
            why = "it was banned" if sender in self.banned_senders else "its stream of parts ended"
            logger.warning("stopped reducing the parts of %s after %d of %d: %s", sender, sent, expected, why)


class SharedAverages:
    """Mixed into an AllReduceRunner: every member of a group ends a round with the same values.

    hivemind's reducer sends each sender the difference between a part's average and that sender's
    own part, through the codec, and keeps the exact average itself: every member ends the round
    with its own codec error. Peers that averaged every gradient round then still stepped on
    different gradients, and Adam turned the 8-bit codec's error in a value near zero into whole
    steps apart (two peers 0.0065 apart after two epochs whose state rounds found nobody). Here a
    reducer encodes each part's average once, sends that message to every sender, and every member,
    the reducer too, takes the decoded message as the part's new value (the runner's outputs are
    averages, not differences; a failed reducer's parts keep the member's own values). Peers of
    hivemind's format would read an average as a difference: the training key names the format
    (peer.run_config.ALLREDUCE_FORMAT)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tensor_part_container.return_deltas = False
        self._encoded_averages: dict[int, asyncio.Future[runtime_pb2.Tensor]] = {}

    def _encoded_average(
        self, part_index: int, average: torch.Tensor, encode: Callable[[torch.Tensor], runtime_pb2.Tensor]
    ) -> asyncio.Future[runtime_pb2.Tensor]:
        """The message of a part's average: encoded once, by the first member whose part is in, with
        that member's codec (all members decode the same message, whatever codec each sent with)."""
        if part_index not in self._encoded_averages:
            self._encoded_averages[part_index] = asyncio.get_running_loop().run_in_executor(None, encode, average)
        return self._encoded_averages[part_index]

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        """hivemind's, but for this peer's own parts: their new values are the decoded averages its
        other members receive. hivemind's exchange with another reducer registers what that
        reducer sends: the decoded average too."""
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        parts = self.tensor_part_container
        loop = asyncio.get_running_loop()
        infos = [info for _, info in parts._input_parts_by_peer[peer_index]]  # a copy: finalize() clears them
        for part_index, (part, info) in enumerate(zip(self.parts_for_local_averaging, infos)):
            average = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=self.weight)
            message = await self._encoded_average(part_index, average, partial(parts.compression.compress, info=info))
            average = await loop.run_in_executor(None, deserialize_torch_tensor, message)
            parts.register_processed_part(peer_index, part_index, average)

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        """hivemind's reducer loop, answering each part with its average's shared message."""
        part_index = 0
        try:
            async for part, weight, compression in amap_in_executor(
                lambda message: (
                    deserialize_torch_tensor(message.tensor_part),
                    message.weight,
                    message.tensor_part.compression,
                ),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    average = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, part, weight=weight
                    )
                except BannedException:
                    break  # hivemind no longer reduces a banned sender's parts
                encoded = await self._encoded_average(
                    part_index, average, partial(serialize_torch_tensor, compression_type=compression)
                )
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=encoded)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class MeanRunner(ReducerFailures, SharedAverages, AllReduceRunner):
    """hivemind's weighted mean, shared by the whole group, reporting failed reducers."""


class CenteredClipRunner(ReducerFailures, SharedAverages, CenteredClipAllReduceRunner):
    """CenteredClip (peer.robust), shared by the whole group, reporting failed reducers."""


RUNNERS: dict[str, type[AllReduceRunner]] = {"centered-clip": CenteredClipRunner, "mean": MeanRunner}


class RoundOutcome(enum.Enum):
    """How an all-reduce round ended for this peer."""

    SUCCEEDED = "succeeded"  # every part of its tensors came back averaged with the group
    PARTIAL = "partial"  # some parts did not: there the peer kept its own values
    FAILED = "failed"  # no group, an error or a timeout: it kept its own values everywhere


class RoundTiming(NamedTuple):
    """How long a round that formed a group took: from when its step began looking for a group to
    the start of the all-reduce (pre-scheduled rounds include the wait for the peer's trigger), and
    the all-reduce itself."""

    group_size: int
    to_group_seconds: float
    allreduce_seconds: float


class GatheredRound(dict):
    """What a round gathered from the group (hivemind's result: peer id -> gathered data), the
    fraction of this peer's values that came back averaged with the group, why the reducers that
    did not average theirs failed (reducer peer id -> error), and how long it took."""

    def __init__(
        self, gathered: dict, averaged_fraction: float, reducer_failures: dict[str, str], timing: RoundTiming
    ) -> None:
        super().__init__(gathered)
        self.averaged_fraction = averaged_fraction
        self.reducer_failures = reducer_failures
        self.timing = timing


class AggregatingAverager(DecentralizedAverager):
    """hivemind's DecentralizedAverager whose reducers combine their parts with the run's aggregation
    ("centered-clip" or hivemind's weighted "mean")."""

    def __init__(self, *args, aggregation: str = "centered-clip", faults: FaultPlan | None = None, **kwargs) -> None:
        self.runner_class = faults.runner_class(RUNNERS[aggregation]) if faults else RUNNERS[aggregation]
        self._faults = faults
        self._averaged_fractions: dict[bytes, float] = {}  # by group id, in the averager's process
        self._reducer_failures: dict[bytes, dict[str, str]] = {}  # by group id, in the averager's process
        self._parts_served = 0  # reducer streams open, in the averager's process
        # Bytes of the all-reduce messages this peer sent, counted in the averager's process.
        self._bytes_sent = multiprocessing.get_context("fork").Value(ctypes.c_uint64, 0)
        # Kernels replaced by their reference in the averager's process (the codec's, model.kernels.guard).
        self._kernel_fallbacks = multiprocessing.get_context("fork").Value(ctypes.c_uint32, 0)
        super().__init__(*args, **kwargs)

    @property
    def bytes_sent(self) -> int:
        """Bytes of all-reduce messages (tensor parts and averages) this averager has sent so far."""
        return self._bytes_sent.value

    @property
    def kernel_fallbacks(self) -> int:
        """Kernels its process replaced by their reference (a codec payload that did not read back)."""
        return self._kernel_fallbacks.value

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """DecentralizedAverager's reducer side, counted: a round ends for this peer when its own
        averages are in, while it may still be sending the last averages to slower members."""
        self._parts_served += 1
        try:
            async for message in super().rpc_aggregate_part(stream, context):
                yield message
        finally:
            self._parts_served -= 1

    async def _shutdown(self, timeout: float | None) -> None:
        """DecentralizedAverager's shutdown, once this peer has sent the averages it still owes to
        the members of its last rounds (up to half the shutdown timeout): leaving right after a
        round otherwise cuts their last parts off, and their round ends partial."""
        deadline = time.monotonic() + (timeout or 0.0) / 2
        while self._parts_served > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._parts_served > 0:
            logger.warning(
                "left with %d streams of averages still being sent: their rounds end partial", self._parts_served
            )
        await super()._shutdown(timeout)

    async def _step(self, *, step, future_for_init) -> None:
        _looking_since.set(time.monotonic())  # this step runs as a task of its own: the value is its own
        if self._faults is not None:  # in the averager's process, where its matchmaking lives
            self._faults.delay_group_assembly(self._matchmaking)
        await super()._step(step=step, future_for_init=future_for_init)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs) -> GatheredRound:
        """DecentralizedAverager's aggregation, returning with the gathered data the fraction of this
        peer's values that were averaged: hivemind fills the parts of a reducer that failed or timed
        out with the peer's own values and still reports the round as done."""
        began = time.monotonic()
        try:
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            timing = RoundTiming(len(group_info.peer_ids), began - _looking_since.get(began), time.monotonic() - began)
            return GatheredRound(
                gathered,
                self._averaged_fractions.get(group_info.group_id, 0.0),
                self._reducer_failures.get(group_info.group_id, {}),
                timing,
            )
        finally:
            self._averaged_fractions.pop(group_info.group_id, None)
            self._reducer_failures.pop(group_info.group_id, None)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs
    ) -> None:
        """DecentralizedAverager's in-place all-reduce, with runner_class in place of AllReduceRunner."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = self.runner_class(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            bytes_sent=self._bytes_sent,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered for all-reduce"
        self._running_groups[group_id].set_result(runner)
        try:
            await self._take_averages(runner, tensors, group_info, group_id)
        finally:
            self._kernel_fallbacks.value = len(kernel_guard.fallbacks())

    async def _take_averages(
        self, runner: AllReduceRunner, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes
    ) -> None:
        """Run the round's runner and copy in the averages it yields, noting how much was averaged."""
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, average in azip(as_aiter(*tensors), runner):
                tensor.copy_(average)  # the group's shared average (SharedAverages); hivemind's alpha stays 1
                self.last_updated = get_dht_time()
                self._state_updated.set()
            parts = runner.tensor_part_container
            self._averaged_fractions[group_id] = 1.0 - parts.failed_size / max(1, parts.total_size)
            self._reducer_failures[group_id] = dict(runner.reducer_failures)
        else:
            async for _ in runner:
                raise ValueError("auxiliary peers do not receive averaged tensors")
            self._averaged_fractions[group_id] = 1.0


class CountingGradientAverager(GradientAverager, AggregatingAverager):
    """hivemind's GradientAverager with the run's aggregation (AggregatingAverager), counting its
    all-reduce rounds by outcome (RoundOutcome), loading no state and offering none."""

    # The epoch this peer's next round ends (set by CollaborativeOptimizer): every round gathers it
    # from each member, so that a peer whose epoch is behind its group's learns it.
    round_epoch: Callable[[], int] | None = None

    def __init__(self, *args, **kwargs) -> None:
        # hivemind offers every averager's state to loading peers, and re-declares the offer in the DHT
        # after each tensor a round averages: a burst of stores per round for buffers nobody loads.
        kwargs["allow_state_sharing"] = False
        super().__init__(*args, **kwargs)
        self.rounds = {outcome: 0 for outcome in RoundOutcome}
        self.partial_fractions: list[float] = []  # the averaged fraction of each partial round
        self.latest_round_epochs: RoundEpochs | None = None  # of the latest succeeded round settled, until taken
        self.round_problems: list[str] = []  # why the rounds settled since take_round_problems did not succeed
        self.round_timings: list[RoundTiming] = []  # of the rounds with a group settled since take_round_timings
        self._unsettled: list = []  # StepControls of rounds not counted yet, oldest first

    def schedule_step(self, *args, **kwargs):
        if self.round_epoch is not None:
            kwargs.setdefault("gather", self.round_epoch())
        return super().schedule_step(*args, **kwargs)

    def take_round_epochs(self) -> RoundEpochs | None:
        """This peer's epoch and its group's in the latest succeeded round settled since the last call."""
        epochs, self.latest_round_epochs = self.latest_round_epochs, None
        return epochs

    def take_round_problems(self) -> list[str]:
        """Why the rounds settled since the last call did not average every value (one line each)."""
        problems, self.round_problems = self.round_problems, []
        return problems

    def take_round_timings(self) -> list[RoundTiming]:
        """How long the rounds that formed a group, settled since the last call, took."""
        timings, self.round_timings = self.round_timings, []
        return timings

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None, **kwargs) -> None:
        """Nothing to load. hivemind.Optimizer downloads its gradient averager's state (another
        peer's gradient buffers, as large as the model) right after the training state, and discards
        it: the accumulated gradients are reset after a load anyway."""
        return None

    def step(self, *args, wait: bool = True, **kwargs):
        control = super().step(*args, wait=False, **kwargs)
        self._unsettled.append(control)
        return control.result() if wait else control

    def settle_rounds(self) -> list[RoundOutcome]:
        """Count the rounds that ended since the last call (in the caller's thread: hivemind.Optimizer
        has waited for a round before its epoch ends, so every round before that epoch is counted)."""
        settled = []
        while self._unsettled and self._unsettled[0].done():
            settled.append(self._outcome(self._unsettled.pop(0)))
        return settled

    def _outcome(self, control) -> RoundOutcome:
        outcome, fraction = round_outcome(control)
        if outcome is not RoundOutcome.FAILED:
            self.round_timings.append(control.result().timing)
        if outcome is RoundOutcome.SUCCEEDED:
            self.latest_round_epochs = round_epochs(control, self.peer_id)
        if outcome is RoundOutcome.PARTIAL:
            self.partial_fractions.append(fraction)
            failures = "; ".join(f"{peer}: {error}" for peer, error in control.result().reducer_failures.items())
            self.round_problems.append(f"partial, {100 * fraction:.3f}% averaged; failed reducers: {failures}")
            logger.warning(
                "partial averaging round: %.3f%% of the gradient was averaged with the group, the rest is "
                "this peer's own (failed reducers: %s)",
                100 * fraction,
                failures,
            )
        elif outcome is RoundOutcome.FAILED:
            if control.cancelled():
                why = "cancelled"
            elif control.exception() is not None:
                why = repr(control.exception())
            else:
                why = "a group of this peer alone"
            self.round_problems.append(f"failed: {why}")
        self.rounds[outcome] += 1
        return outcome


class RoundEpochs(NamedTuple):
    """The epoch a peer's round ended, as the peer counted it and as its group did (the latest of
    its members': hivemind's matchmaking keys carry no epoch, so a group may mix epochs)."""

    own: int
    group: int

    @property
    def behind(self) -> int:
        return max(0, self.group - self.own)


def round_epochs(control, peer_id) -> RoundEpochs | None:
    """The epochs of a finished gradient round that averaged with a group (in full or in part),
    from what each member gathered (CountingGradientAverager.round_epoch); None for any other."""
    if round_outcome(control)[0] is RoundOutcome.FAILED:
        return None
    epochs = {peer: epoch for peer, epoch in control.result().items() if isinstance(epoch, int)}
    if peer_id not in epochs:
        return None
    return RoundEpochs(own=epochs[peer_id], group=max(epochs.values()))


class StateRound(NamedTuple):
    """How a state averaging round ended for this peer, and how many peers its group had (1: none found)."""

    outcome: RoundOutcome
    group_size: int


class StateRoundsAverager(AggregatingAverager):
    """The base of the state averager: hivemind's plain mean (as TrainingStateAverager averages),
    keeping its rounds so that the peer learns whether a state averaging round averaged every value
    with a group. It sits below TrainingStateAverager, whose rounds start through
    DecentralizedAverager.step (pre-scheduled or not): that is the step wrapped here."""

    off_swarm = False  # set by the peer while its parameters are off the swarm's (after a partial round)
    # Epochs this peer counts without their state: it took its group's epoch number from a gradient
    # round while its parameters stayed of an older epoch, until it takes a state (a load, or a state
    # round that gives it the group's). Set and cleared by the peer's own process.
    epochs_without_state = 0

    def __init__(self, *args, **kwargs) -> None:
        self._state_rounds: list = []  # StepControls, oldest first; appended from hivemind's background thread
        # The latest group epoch whose state this peer took in a round (it was behind), not yet
        # applied: written in the averager's process once the round averaged every value, -1 if none.
        self._group_epoch_taken = multiprocessing.get_context("fork").Value(ctypes.c_int64, -1)
        super().__init__(*args, aggregation="mean", **kwargs)

    def step(self, *args, wait: bool = True, gather: object = None, **kwargs):
        """DecentralizedAverager's step. Where hivemind's state averager gathers its epoch, this
        gathers the rank of the state it brings (StateRank): the epoch its parameters are of, which
        is older than its count after it took a group's epoch number without their state, and
        whether they are the swarm's. A member that claimed the epoch it counts had its older or
        off-swarm parameters averaged in with full weight: the group's peers then ended apart from
        the swarm's others (in DiLoCo mode by half an outer step)."""
        if isinstance(gather, int):
            gather = list(StateRank(gather - self.epochs_without_state, not self.off_swarm))
        control = super().step(*args, wait=False, gather=gather, **kwargs)
        self._state_rounds.append(control)
        return control.result() if wait else control

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs) -> GatheredRound:
        """A member whose state ranks below the best of its group's members that hold state (of an
        older epoch, or off the swarm's parameters) takes part with weight 0: it receives their state
        instead of pulling theirs toward its own. hivemind's state rounds match peers of any epoch,
        and in DiLoCo mode an epoch is a whole outer step (a slow peer's round once left the others
        0.018 apart). Members of equal rank average, so that a group all off the swarm's parameters
        comes back together."""
        ranks = state_ranks(group_info, self.serializer)
        own, best = ranks.get(self.peer_id), max(ranks.values(), default=None)
        behind = own is not None and own < best
        if behind:
            logger.info(
                "state round: this peer's state (epoch %d, %s the swarm's) ranks below its group's (epoch %d): "
                "taking theirs",
                own.epoch,
                "on" if own.on_swarm else "off",
                best.epoch,
            )
            kwargs["weight"] = 0.0
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        if behind and gathered.averaged_fraction >= 1.0:  # a partial round left it neither epoch's state
            with self._group_epoch_taken.get_lock():
                self._group_epoch_taken.value = max(self._group_epoch_taken.value, best.epoch)
        return gathered

    def take_group_epoch(self) -> int | None:
        """The group epoch whose state a round gave this peer since the last call (it was behind),
        or None: once that state is the peer's, so is the epoch."""
        with self._group_epoch_taken.get_lock():
            epoch, self._group_epoch_taken.value = self._group_epoch_taken.value, -1
        return None if epoch < 0 else epoch

    def settle_state_rounds(self) -> list[StateRound]:
        """How the state averaging rounds that ended since the last call ended. A pre-scheduled round
        cancelled before it was triggered was never run: it is not counted."""
        settled = []
        while self._state_rounds and self._state_rounds[0].done():
            control = self._state_rounds.pop(0)
            if not (control.cancelled() and not control.triggered):
                ran = not control.cancelled() and control.exception() is None
                settled.append(StateRound(round_outcome(control)[0], len(control.result()) if ran else 1))
        return settled


class StateRank(NamedTuple):
    """What a member of a state round gathers about the state it brings: the epoch its parameters
    are of, and whether they are the swarm's. Compared as a tuple: a later epoch ranks higher, and
    within an epoch the swarm's parameters rank above those of a peer off them."""

    epoch: int
    on_swarm: bool


def state_ranks(group_info: GroupInfo, serializer) -> dict[PeerID, StateRank]:
    """The rank each member of a state round that holds state (not an auxiliary peer) gathered
    (StateRoundsAverager.step): for the epoch, TrainingStateAverager's, that of its parameters when
    the round averages."""
    ranks = {}
    for peer_id, gathered in zip(group_info.peer_ids, group_info.gathered):
        _, mode, user_data = serializer.loads(gathered)  # as DecentralizedAverager packs it in matchmaking
        rank = serializer.loads(user_data)
        if (
            AveragingMode(mode) != AveragingMode.AUX
            and isinstance(rank, list)
            and len(rank) == 2
            and isinstance(rank[0], int)
            and isinstance(rank[1], bool)
        ):
            ranks[peer_id] = StateRank(*rank)
    return ranks


def round_outcome(control) -> tuple[RoundOutcome, float]:
    """How a finished round ended for this peer, and the fraction of its values averaged with the group."""
    if control.cancelled() or control.exception() is not None:
        return RoundOutcome.FAILED, 0.0
    result = control.result()
    if len(result) < 2:
        return RoundOutcome.FAILED, 0.0  # a group of this peer alone: nothing was averaged
    fraction = result.averaged_fraction
    if fraction >= 1.0:
        return RoundOutcome.SUCCEEDED, fraction
    return (RoundOutcome.FAILED if fraction <= 0.0 else RoundOutcome.PARTIAL), fraction
