"""Loading training state from other peers, checking each donor's state before taking it.

hivemind's averagers download the state of the donor with the highest priority (its epoch) and
hand it over unchecked: a donor whose model has another shape, whose tensors hold NaN, or whose
metadata is malformed makes the load fail, and hivemind.Optimizer retries the same donor forever.
Here each donor's state is checked; a donor that fails is refused, remembered and not asked again,
and the next donor by priority is asked.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import multiprocessing
import random
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import deserialize_tensor_stream
from hivemind.dht import DHT
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.nested import nested_flatten
from hivemind.utils.timed_storage import ValueWithExpiration
from tqdm.auto import tqdm

from peer.averager import StateRoundsAverager

logger = logging.getLogger("starling.peer")

# A state of a later epoch moves the learning-rate schedule on by stepping the scheduler without an
# optimizer step (hivemind's _update_scheduler): nothing is out of order, and torch's warning that
# it is would print at a peer's first state load.
warnings.filterwarnings(
    "ignore",
    message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
    category=UserWarning,
    module="hivemind.optim.state_averager",
)

State = tuple[dict, list[torch.Tensor]]
# Taken off the state-sharing priority (the epoch) of a peer whose parameters are off the swarm's:
# donors of its epoch come first, and the coordinator's checkpoint (epoch + 0.5) is not passed over.
OFF_SWARM_PENALTY = 0.25


class OlderState(Exception):
    """A donor's state turned out older than the epoch this peer takes (its offer was out of date)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch


class DonorCheckingAverager(DecentralizedAverager):
    """A DecentralizedAverager that checks each donor's state (check_state) before taking it.

    It answers and calls state-sharing RPCs under hivemind's TrainingStateAverager names, so that
    it shares state with the peers' state averagers of the same prefix.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._refused_donors: dict[
            bytes, str
        ] = {}  # peer id -> why; kept in the averager's process, where downloads run
        # Shared with the averager's process (created before it is forked): what the next load may
        # take, and how many states it handed over, each of them checked to fit.
        self._min_donor_priority = multiprocessing.Value(ctypes.c_double, -math.inf)
        self._min_state_epoch = multiprocessing.Value(ctypes.c_int64, 0)
        self._states_received = multiprocessing.Value(ctypes.c_int64, 0)
        super().__init__(*args, **kwargs)

    @property
    def states_received(self) -> int:
        """How many loads so far received a state that fits (and was therefore applied)."""
        return self._states_received.value

    def limit_next_load(self, min_donor_priority: float = -math.inf, min_epoch: int = 0) -> None:
        """Let the next load ask only donors that offer at least min_donor_priority, and take no
        state older than min_epoch."""
        self._min_donor_priority.value, self._min_state_epoch.value = min_donor_priority, min_epoch

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        return TrainingStateAverager._get_handle_name(namespace, method_name)

    def check_state(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        """What is wrong with a donor's state, or None if it can be taken."""
        raise NotImplementedError

    def refused_donors(self) -> dict[bytes, str]:
        """The donors whose state was refused so far: peer id (bytes) -> what was wrong with it."""
        future = MPFuture()
        self._outer_pipe.send(("_report_refused_donors", [], dict(future=future)))
        return future.result()

    async def _report_refused_donors(self, future: MPFuture) -> None:
        future.set_result(dict(self._refused_donors))

    async def _load_state_from_peers(self, future: MPFuture, timeout: float | None = None) -> None:
        """Hand `future` the state of the first donor by priority whose state fits, or None."""
        # hivemind's meaning of timeout: the longest wait for each part of the stream
        if timeout is not None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            for donor in self._donors_by_priority():
                state = await self._download_state(donor, timeout)
                if state is None:
                    continue
                problem = check_metadata_epoch(state[0]) or self.check_state(*state)
                if problem is not None:
                    logger.warning("refused the state of %s: %s; asking the next donor", donor, problem)
                    self._refused_donors[donor.to_bytes()] = problem
                    continue
                # (a state older than _min_state_epoch was left in _download_state, before its tensors)
                self._states_received.value += 1
                future.set_result(state)
                return
            logger.info("no donor sent a state that fits this one")
        finally:
            if not future.done():
                future.set_result(None)

    def _donors_by_priority(self) -> list[PeerID]:
        """Peers offering their state, highest priority (latest epoch) first, ties in random order."""
        priority = {
            peer: (value, random.random())
            for peer, value in state_offers(self.dht, self.prefix).items()
            if value >= self._min_donor_priority.value
        }
        return [
            peer
            for peer in sorted(priority, key=priority.get, reverse=True)
            if peer != self.peer_id and peer.to_bytes() not in self._refused_donors
        ]

    async def _download_state(self, donor: PeerID, timeout: float | None) -> State | None:
        started = time.monotonic()
        logger.info("downloading state from %s", donor)
        metadata = None
        try:
            stub = self.get_stub(self._p2p, donor, namespace=self.prefix)
            # opening the stream is a wait for the donor like each of its messages
            stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()), timeout)
            with tqdm(desc="downloading state", unit="B", unit_scale=True, leave=False) as bar:

                async def tensor_parts():
                    nonlocal metadata
                    async for message in aiter_with_timeout(stream, timeout=timeout):
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                            epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
                            if isinstance(epoch, int) and epoch < self._min_state_epoch.value:
                                raise OlderState(epoch)  # before its tensors: their download would be wasted
                        bar.update(len(message.tensor_part.buffer))
                        yield (message.tensor_part,)

                tensors = await deserialize_tensor_stream(tensor_parts())
                received = bar.n
        except OlderState as older:
            logger.info("%s has the state of epoch %d, older than this peer's; not downloading it", donor, older.epoch)
            return None
        except Exception as error:
            logger.warning("failed to download state from %s: %r", donor, error)
            return None
        if not metadata:
            logger.info("%s did not send its state", donor)
            return None
        logger.info("downloaded %.1f MB of state from %s in %.2f s", received / 1e6, donor, time.monotonic() - started)
        return metadata, tensors


class CheckedStateAverager(DonorCheckingAverager, TrainingStateAverager, StateRoundsAverager):
    """hivemind's TrainingStateAverager taking only state that fits its own: as many tensors, of the
    same shapes, finite, and optimizer metadata of the same layout."""

    def __init__(self, *args, **kwargs) -> None:
        # hivemind counts an epoch before its background thread runs that epoch's optimizer step: a
        # state read in between would pair the new epoch with the old parameters (a checkpoint one
        # step behind its label). These count the epochs whose step has not run yet.
        self._epoch_count = threading.Lock()
        self._epochs_unstepped = 0
        self._optimizer_stepped = False  # in the call of _do under way
        self.group_states_taken = 0  # state rounds that gave this peer a later epoch's state, and that epoch
        super().__init__(*args, **kwargs)
        self.optimizer.register_step_post_hook(lambda *_: self._finish_epoch_step())

    def step(self, *args, increment_epoch: bool = False, optimizer_step: bool = False, **kwargs):
        """TrainingStateAverager's step; an epoch it counts for an optimizer step is counted as not
        stepped until that step has run. A state round that gave this peer the state of the epoch
        it is stepping into (it was behind its group) already holds that epoch's optimizer step: it
        is applied first, and the step is not taken again."""
        if increment_epoch and optimizer_step:
            entering = self.local_epoch + 1
            if kwargs.get("wait_for_trigger") is None and self._settle_state_rounds(kwargs):
                if self.local_epoch >= entering:
                    logger.info("a state round gave this peer epoch %d's state: its own step is in it", entering)
                    self._enter_group_state()
                    return super().step(*args, optimizer_step=False, **kwargs)
            with self._epoch_count:
                self.local_epoch += 1
                self._epochs_unstepped += 1
            increment_epoch = False
        return super().step(*args, increment_epoch=increment_epoch, optimizer_step=optimizer_step, **kwargs)

    def schedule_step(self, *args, gather: object = None, **kwargs):
        """The state round of this peer's next epoch step, gathering the epoch its parameters will be
        of then. hivemind's optimizer passes the later of that and the run's epoch: a peer behind the
        run claimed an epoch it did not hold, and its group averaged its older parameters in."""
        return super().schedule_step(*args, gather=self.local_epoch + 1, **kwargs)

    def take_epoch_without_state(self, epoch: int) -> None:
        """Count `epoch`, later than this peer's, as its own while its parameters stay of the older
        epoch (its group's gradient round was ahead): its state rounds still gather the older one,
        so that a group takes its state with weight 0 and gives it theirs."""
        with self._epoch_count:
            self.epochs_without_state += epoch - self.local_epoch
            self.local_epoch = epoch

    def _settle_state_rounds(self, step_kwargs: dict) -> bool:
        """Apply the state rounds that the coming step would apply before its optimizer step (waiting
        for those under way where it would wait: hivemind's default, or as the caller asks); whether
        one was applied."""
        wait = step_kwargs.get("wait_for_delayed_updates")
        if wait is None:
            wait = bool(step_kwargs.get("averaging_round"))
        if not (self.finished_averaging_round.is_set() or (wait and self.pending_updates)):
            return False
        super().step(wait_for_delayed_updates=wait, apply_delayed_updates=True)
        return True

    def _enter_group_state(self) -> None:
        """The model takes the state a state round gave it in place of its own step's result (in
        batch mode applying the round already copied it in)."""

    def _do(self, wait_for_trigger, optimizer_step: bool, *args, **kwargs):
        # hivemind runs these one at a time, in the order their steps were counted
        self._optimizer_stepped = False
        try:
            return super()._do(wait_for_trigger, optimizer_step, *args, **kwargs)
        finally:
            if optimizer_step and not self._optimizer_stepped:  # it gave up before the step
                self._finish_epoch_step()

    def _finish_epoch_step(self) -> None:
        with self._epoch_count:
            self._optimizer_stepped = True
            self._epochs_unstepped = max(0, self._epochs_unstepped - 1)

    def _apply_averaging_results_(self) -> None:
        super()._apply_averaging_results_()
        self._take_group_epoch()

    def _apply_optimizer_parameters_(self) -> None:
        super()._apply_optimizer_parameters_()
        if self.reuse_tensors:  # averaged in place: the parameters just copied hold any round that ended
            self._take_group_epoch()

    def _take_group_epoch(self) -> None:
        """A state round that gave this peer the state of its group's later epoch has reached its
        parameters: that epoch is now its own. Keeping the older one left the parameters a step
        ahead of their epoch (a peer stopping then saved epoch N + 1's parameters as epoch N's)."""
        epoch = self.take_group_epoch()
        if epoch is not None:
            self.epochs_without_state = 0  # its parameters are the group's now
        if epoch is None or epoch <= self.local_epoch:
            return
        logger.info("took epoch %d's state from a state averaging round (was at epoch %d)", epoch, self.local_epoch)
        with self._epoch_count:
            self.local_epoch = epoch
        self.group_states_taken += 1
        self._update_scheduler()

    def get_current_state(self):
        """The state hivemind shares with loading peers and the coordinator, labelled with the epoch
        its parameters are of; copied while no optimizer step runs. hivemind hands the averager's
        process the live tensors, which it streams for as long as the download takes: a step of
        this peer meanwhile sent a loader some tensors of one epoch and some of the next."""
        with self.lock_optimizer:
            with self._epoch_count:
                epoch = self.local_epoch - self._epochs_unstepped
            metadata, tensors, infos = super().get_current_state()
            tensors = [tensor.detach().clone() for tensor in tensors]
        return {**metadata, "epoch": epoch}, tensors, infos

    @property
    def state_sharing_priority(self) -> float:
        return DecentralizedAverager.state_sharing_priority.fget(self)

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        """hivemind offers a peer's state with its epoch as priority; a peer off the swarm offers it
        with OFF_SWARM_PENALTY less, after every peer of its epoch that is not."""
        DecentralizedAverager.state_sharing_priority.fset(
            self, value - OFF_SWARM_PENALTY if self.off_swarm and value else value
        )

    def load_state_from_peers(
        self,
        wait: bool = True,
        timeout: float | None = None,
        min_donor_priority: float = -math.inf,
        min_epoch: int = 0,
    ):
        """TrainingStateAverager's load from the first donor by priority whose state fits, asking
        only donors that offer at least min_donor_priority, and passing over a donor whose state is
        older than min_epoch or this peer's epoch (hivemind would discard it after downloading it)."""
        self.limit_next_load(min_donor_priority, min_epoch=max(min_epoch, self.local_epoch))
        averaged = self._averaged_statistics()
        received = self.states_received
        loaded = super().load_state_from_peers(wait=wait, timeout=timeout)
        if self.states_received > received:
            self.epochs_without_state = 0
        with torch.no_grad(), self.lock_averaged_tensors:
            for (param, key), tensor in averaged.items():
                state = self.optimizer.state[param]
                if state.get(key) is not tensor:
                    tensor.copy_(state[key])
                    state[key] = tensor
        return loaded

    def _averaged_statistics(self) -> dict[tuple[torch.Tensor, str], torch.Tensor]:
        """The optimizer's statistics that state rounds average in place (hivemind's reuse_tensors,
        with offload_optimizer): the averager's process shares these very tensors. hivemind loads a
        state with the optimizer's load_state_dict, which puts new tensors in their place, and left
        alone the averager would go on averaging the old ones: the peer's own moments would never be
        averaged again, and the others would average theirs with its stale ones."""
        if not self.reuse_tensors:  # hivemind copies the statistics into its averaged tensors
            return {}
        return {
            (param, key): self.optimizer.state[param][key]
            for group in self.optimizer.param_groups
            for param in group["params"]
            for key in self.opt_keys_for_averaging
        }

    def check_state(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        parameters = [param for group in self.optimizer.param_groups for param in group["params"]]
        own_metadata, own_optimizer_tensors = optimizer_state_layout(self.optimizer)
        problem = check_tensors(tensors, [*parameters, *self.extra_tensors, *own_optimizer_tensors])
        if problem is None and not isinstance(metadata.get("optimizer_metadata"), list):
            return "its optimizer metadata is not a list"
        return problem or check_optimizer_metadata(metadata["optimizer_metadata"], own_metadata)


def state_offers(dht: DHT, prefix: str) -> dict[PeerID, float]:
    """The peers that offer their state under a state averager's prefix, with their priority (the
    epoch of their state; the coordinator's checkpoint counts half an epoch more)."""
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    offers = found.value if found is not None and isinstance(found.value, dict) else {}
    return {
        PeerID(peer_id): float(offer.value)
        for peer_id, offer in offers.items()
        if isinstance(offer, ValueWithExpiration) and isinstance(offer.value, (float, int))
    }


def check_metadata_epoch(metadata: Any) -> str | None:
    if not isinstance(metadata, dict):
        return f"its metadata is a {type(metadata).__name__}, not a dict"
    epoch = metadata.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return f"its epoch is {epoch!r}"
    return None


def check_tensors(received: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> str | None:
    """Whether `received` has the count and shapes of `expected`, and finite floating-point values."""
    if len(received) != len(expected):
        return f"it sent {len(received)} tensors, {len(expected)} expected"
    for index, (tensor, own) in enumerate(zip(received, expected)):
        if tensor.shape != own.shape:
            return f"tensor {index} has shape {tuple(tensor.shape)}, {tuple(own.shape)} expected"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"tensor {index} holds non-finite values"
    return None


def optimizer_state_layout(optimizer: torch.optim.Optimizer) -> tuple[list[dict], list[torch.Tensor]]:
    """The optimizer's state flattened as hivemind's dump_optimizer_state does, without copying tensors."""
    metadata, tensors = [], []
    for element in nested_flatten(optimizer.state_dict()):
        if isinstance(element, torch.Tensor):
            metadata.append(dict(type="tensor", index=len(tensors)))
            tensors.append(element)
        else:
            metadata.append(dict(type="value", value=element))
    return metadata, tensors


def check_optimizer_metadata(received: list, own: list[dict]) -> str | None:
    """Whether a donor's flattened optimizer metadata has this optimizer's layout: the same entries,
    tensors at the same places, values of the same kinds (numbers, flags, names)."""
    if len(received) != len(own):
        return f"its optimizer metadata has {len(received)} entries, {len(own)} expected"
    for index, (entry, own_entry) in enumerate(zip(received, own)):
        if not isinstance(entry, dict) or entry.get("type") != own_entry["type"]:
            return f"optimizer metadata entry {index} is {entry!r}, a {own_entry['type']} expected"
        if own_entry["type"] == "tensor" and entry.get("index") != own_entry["index"]:
            return f"optimizer metadata entry {index} points at tensor {entry.get('index')!r}"
        if own_entry["type"] == "value" and _kind(entry.get("value")) != _kind(own_entry["value"]):
            return f"optimizer metadata entry {index} is {entry.get('value')!r}, like {own_entry['value']!r} expected"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else type(value).__name__
