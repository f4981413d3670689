"""Where hivemind 1.1.12 itself is wrong, corrected in one place: `apply()` (idempotent).

Cancelling a pre-scheduled averaging step (`StepControl.cancel`) must be seen by the averager's
process as a cancellation. hivemind signals the averager first (it resolves the step's `_cancel`
future, which travels through a pipe) and marks the step cancelled in shared memory afterwards.
The averager wakes on the signal and reads `step.cancelled()`; when it runs before the caller's
next line, it reads False, takes the wake-up for the end of matchmaking and goes on looking for a
group with the cancelled step. That step then holds the matchmaking lock ("Another look_for_group
is already in progress"), joins the next group a partner forms, and averages stale buffers into
the partner's round; the step that was meant for that round finds nobody ("could not find a
group") and the optimizer waits for it up to the averaging timeout. hivemind.Optimizer cancels
pre-scheduled rounds whenever it believes it is alone, so two peers of fast epochs met this in
about half of their runs. Fixed by marking the step cancelled before anything is signalled.

Creating the optimizer state (`initialize_optimizer_state_`, run by every TrainingStateAverager)
takes a virtual optimizer step with zero gradients so that the state tensors exist. With the run's
learning rate that step is not virtual: decoupled weight decay (AdamW, SGD with weight_decay)
shrinks every parameter by lr x weight_decay before training starts, so a run's first epoch was
not the step its optimizer defines. Fixed by taking the virtual step at a learning rate of zero.

A follower that a leader accepted waits for the group (BEGIN_ALLREDUCE) until its own expiration
plus `request_timeout`. The leader assembles the group at its own expiration (no later than the
follower's), under its matchmaking lock, which its own join request to another would-be leader
may hold for up to `request_timeout` at that moment (and a loaded machine delays it further). The
follower then gives up just as the group is formed: the leader either goes on without it or counts
it in a group it never joins (the others' round is partial, the follower's "could not find a
group"). Fixed by asking leaders to hold the follower one `request_timeout` longer: the follower
waits that much longer for a live leader (a dead one closes the stream at once).

A leader refuses a follower whose request expires before the leader's own group does, and a
follower asks each leader once per declaration. A peer in client mode cannot lead, so when its
round was scheduled before the others' (its count of the epoch's progress ended first) it was
refused by every leader, and they averaged without it; it then waited for a group until its
averaging timeout, or joined the others' next round. Fixed by having a client-mode follower's
request expire when its search ends: it waits for any leader whose group forms before then.

A request to the DHT process from another process (an averager declaring its group key or its
state) carries the pipe end that its reply goes back through, passed as a file descriptor that the
sender's process hands over when the request is read. An averager that stops right after sending
one (every peer's averagers do, as the peer stops) is gone by then: reading the request fails,
and the DHT process logs a traceback and sleeps three seconds before it reads the next one, so a
stopping peer waited about 3 s per such request. When the sender was still exiting as the DHT
process reached it, the handover broke off in its handshake (EOFError) and ended the DHT process,
whose libp2p daemon then outlived its peer. Fixed by dropping a request whose sender is gone
(nobody is left to answer) and reading on; a broken request pipe is still hivemind's to handle.
The DHT process's event loop watches that pipe, which leaves it non-blocking: a request longer than
the pipe's buffer (64 KiB: a store of a large value, or of many records at once) arrives in several
reads, and the first read that found the pipe empty meanwhile raised BlockingIOError and ended the
DHT process (within the first 60 stores of 1 MB, in each of 4 runs). Fixed by reading each request
whole, blocking until its sender has written it all (it writes it in one call).

An averager is a process forked from the peer; it serves from a background thread (hivemind's way
around the OpenMP pool a fork may leave broken) and compresses the parts of its tensors in a pool
of threads. The first torch operation of each new thread sets torch's thread count, and in a forked
child the first of those calls also replaces the thread pool inherited from the parent; threads
that start together race on that replacement, and one of them fails with "Invalid thread pool!"
(an internal assertion of PyTorch). The part it was compressing is never sent, so the reducers wait
for it until their part timeout and the round ends partial for everyone. Fixed by setting the
thread count once in the averager's background thread before it starts any other thread.

A reducer sends a member its averaged parts over a stream that ends when the reducer closes its
end. The libp2p daemon then closes its stream and, as its other direction still reads, resets it
(p2pd's doStreamPipe): the member's daemon discards whatever it had received and not yet passed
on, so a member whose process reads slower than the reducer sends (a loaded machine) lost its last
averaged parts, and hivemind saw a stream that ended early ("sent 11 parts, but we expected 14"):
a partial round for that member alone. Fixed in two halves: a member stops reading once it has
every part it expects and closes its end, and a reducer, once it has sent its last part, waits for
that (up to the part timeout) before it closes its own.

While an averager looks for a group, it keeps a queue of the would-be leaders it may join, read from
the DHT. When the queue holds nobody to join (the peer is the one the others should join, or the
others have not declared yet), it asks for a fresh read, and the read, once done, finds the queue as
empty and asks again at once: the averager reads its group key from the DHT as fast as the DHT
answers, for the whole matchmaking time: about 5,800 DHT requests in 6 s of looking, and three
peers of the tiny model in a swarm sent 170 a second each, nearly all of them these reads (every
read reaches more nodes as the swarm grows). 0.5 s between reads brought those to 31.
Fixed by reading the queue at most once every LEADER_QUEUE_PERIOD seconds (a tenth of the
matchmaking time at most): a leader stays declared for the matchmaking time, so it is still found.

A member that receives a part of a group it does not know yet waits for its matchmaking to register
one (the leader may begin the all-reduce before its BEGIN_ALLREDUCE message has arrived). hivemind
wakes that wait when a group is registered, but not when the search ends without a group: a
would-be member that gave up on its leader (or whose step was cancelled) as the leader went on with
it kept the leader's request waiting until that member's next group, and the leader waited for
its parts until the all-reduce timeout (15 s of a 2-peer DiLoCo round, both peers' round failed).
The same wait outlived a step cancelled, or out of time, after its search found a group but before
it registered it (a pre-scheduled round waits for its trigger in between). Fixed by waking those
waits when a search ends without a group and when a step ends: the leader is told at once that
the member is not in its group (BAD_GROUP_ID).

A leader answers a join request over a stream that ends with the leader's last message: the group
(BEGIN_ALLREDUCE), its disbanding or a refusal. hivemind closed the leader's end right after that
message. The leader's libp2p daemon then closes both directions of the stream, and its goroutine
still reading the follower's direction fails and resets the stream, unless the close got there
first (p2pd's doStreamPipe on yamux: the same reset as for the averaged parts above). On a reset
the follower's daemon discards what it has not yet passed on, the message included. A follower
that lost BEGIN_ALLREDUCE sees its leader's stream end, searches on alone until its step runs out
of time, and the leader runs the round with it counted in: partial for the leader, failed for the
follower (about 1 round in 300 of two DiLoCo peers in the tests; 2 in 9,149 rounds of pairs of
averagers averaging back to back on a loaded machine, none in 8,801 with the fix). Fixed as for
the parts: once the leader's last message is sent, its stream waits until the follower closes its
end (it does as soon as it has read it) or request_timeout passes.

An averager's process serves each request of its peer (a round, a state load) as a task of its
event loop, and hivemind keeps no reference to those tasks; asyncio holds tasks weakly, so a task
lives only while something the loop holds leads to it. While the libp2p daemon has not yet opened a
stream the task asked for, nothing does: asyncio holds its reader of the daemon's connection weakly,
and the task and what it waits on are garbage. A collection then destroyed the task ("Task was
destroyed but it is pending"), and its caller waited out its own timeout: a peer loading state from
a donor that was leaving waited 600 s (hivemind's load_state_timeout) in a 32-peer run. Fixed by
giving the averager's loop a task factory that holds each task until it is done.

An averager that shuts down while one of its groups is registered (its all-reduce begun and not yet
done: a peer stopping in a round) calls finalize() on each of its groups' entries, which are futures
of the all-reduce runner, not runners, and its serving thread died with an AttributeError traceback
before its runners were ended. Fixed by ending each registered group as hivemind meant to: a runner
already made is finalized as cancelled, and a group whose runner is not yet made is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import AsyncIterator  # noqa: UP035  (hivemind's servicer reads typing's stream hints, not collections.abc's)

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging import averager as averager_module
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import Matchmaking, PotentialLeaders
from hivemind.dht import DHT
from hivemind.optim import state_averager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, as_aiter
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS, get_dht_time


def _cancel_step(self: StepControl) -> bool:
    """StepControl.cancel, with the step marked cancelled before its trigger and cancel signals go out."""
    cancelled = MPFuture.cancel(self)
    if self._trigger is not None:
        self._trigger.cancel()
    if self._cancel is not None and not self._cancel.done():
        self._cancel.set_result(None)
    return cancelled


def _initialize_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """hivemind's initialize_optimizer_state_ (a step with zero gradients), at a learning rate of zero."""
    learning_rates = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    try:
        _HIVEMIND_INITIALIZE(opt)
    finally:
        for group, lr in zip(opt.param_groups, learning_rates):
            group["lr"] = lr


def _request_expiration_time(self: Matchmaking) -> float:
    """Matchmaking.get_request_expiration_time, one request timeout later; in client mode, the end
    of the search (see above)."""
    search_end = self.potential_leaders.search_end_time
    if self.client_mode and math.isfinite(search_end):
        return search_end
    return _HIVEMIND_REQUEST_EXPIRATION(self) + self.request_timeout


class _RequestPipe:
    """The DHT process's end of its request pipe, where a request whose sender is gone is dropped."""

    def __init__(self, pipe: Connection):
        self._pipe = pipe

    def fileno(self) -> int:
        return self._pipe.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._pipe.poll(timeout)

    def recv(self) -> tuple:
        descriptor = self.fileno()
        was_blocking = os.get_blocking(descriptor)
        os.set_blocking(descriptor, True)
        try:
            message = self._pipe.recv_bytes()
        finally:
            os.set_blocking(descriptor, was_blocking)
        try:
            return ForkingPickler.loads(message)
        # The sender's process, which hands over the reply pipe, has exited (OSError), or was
        # exiting as the handover began (EOFError, in the handshake with its resource sharer).
        except (OSError, EOFError) as error:
            _logger.debug("dropped a DHT request from a process that has exited (%r)", error)
            return "_drop_request", [], {}


def _run_dht(self: DHT) -> None:
    """DHT.run, reading requests through a _RequestPipe."""
    self._inner_pipe = _RequestPipe(self._inner_pipe)
    _HIVEMIND_DHT_RUN(self)


async def _drop_request(self: DHT) -> None:
    """What the DHT process does for a dropped request: nothing."""


class _PartsStub:
    """A reducer's stub whose part stream ends, and is closed, once `expected` parts came back."""

    def __init__(self, stub, expected: int):
        self._stub, self._expected = stub, expected

    async def rpc_aggregate_part(self, requests):
        stream = await self._stub.rpc_aggregate_part(requests)
        return _first_messages(stream, self._expected)


async def _first_messages(stream, count: int):
    try:
        received = 0
        while received < count:
            try:
                message = await anext(stream)
            except StopAsyncIteration:
                return
            received += 1
            yield message
    finally:
        await stream.aclose()  # closes this member's end: the reducer may close its own


def _parts_stub(self: AllReduceRunner, peer: PeerID) -> _PartsStub:
    """AllReduceRunner._get_peer_stub, for a reducer whose stream is read up to the parts expected of it."""
    expected = self.tensor_part_container.num_parts_by_peer[self.ordered_peer_ids.index(peer)]
    return _PartsStub(_HIVEMIND_PEER_STUB(self, peer), expected)


async def _aggregate_part(
    self: DecentralizedAverager, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
) -> AsyncIterator[averaging_pb2.AveragingData]:
    """DecentralizedAverager.rpc_aggregate_part: a part of an unknown group waits for this
    averager's search to register a group or to end without one (see above), and the stream stays
    open after its last message (BAD_GROUP_ID too: closing at once lost it to the daemons' reset in
    about 1 run of 6 of its test) for the part timeout at most."""
    linger = self.next_chunk_timeout or STREAM_LINGER
    async for message in _open_until_read(_aggregated_part(self, stream, context), linger):
        yield message


async def _aggregated_part(
    self: DecentralizedAverager, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
) -> AsyncIterator[averaging_pb2.AveragingData]:
    request = await anext(stream)
    if request.group_id not in self._running_groups:
        await _group_registered_or_none_found(self)
    group = self._running_groups.get(request.group_id)
    if group is None:
        yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
        return
    runner = await group
    async for message in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
        yield message


async def _join_group(
    self: Matchmaking, request: averaging_pb2.JoinRequest, context: P2PContext
) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
    """Matchmaking.rpc_join_group, whose stream stays open after its last message (once the
    request's matchmaking state is released) for request_timeout at most (see above)."""
    async for message in _open_until_read(_HIVEMIND_JOIN_GROUP(self, request, context), self.request_timeout):
        yield message


async def _open_until_read(messages: AsyncIterator, linger: float) -> AsyncIterator:
    """A stream handler's messages, then a wait of `linger` seconds before the handler ends, so that
    its receiver, not the sender, closes the stream: it does as soon as it has read the last message
    (which cancels the wait), and a handler that ended at once left its last messages to the
    daemons' reset (see above)."""
    async for message in messages:
        yield message
    await asyncio.sleep(linger)


async def _group_registered_or_none_found(self: DecentralizedAverager) -> None:
    waits = {
        asyncio.create_task(self._pending_groups_registered.wait()),
        asyncio.create_task(_no_group_pending(self._matchmaking).wait()),
    }
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _no_group_pending(matchmaking: Matchmaking) -> asyncio.Event:
    """Set while no search of the averager may still register a group: before its first search,
    after a search that found none, after a step that ended (a group it found is not registered
    once its step is cancelled or out of time), until the next search begins."""
    if not hasattr(matchmaking, "_starling_no_group_pending"):
        matchmaking._starling_no_group_pending = asyncio.Event()
        matchmaking._starling_no_group_pending.set()
    return matchmaking._starling_no_group_pending


async def _look_for_group(self: Matchmaking, step: StepControl) -> GroupInfo | None:
    """Matchmaking.look_for_group, setting _no_group_pending when it ends without a group."""
    no_group_pending = _no_group_pending(self)
    no_group_pending.clear()
    group = None
    try:
        group = await _HIVEMIND_LOOK_FOR_GROUP(self, step)
        return group
    finally:
        if group is None:
            no_group_pending.set()


async def _step(self: DecentralizedAverager, **kwargs) -> None:
    """DecentralizedAverager._step, setting _no_group_pending when it ends, unless another step searches."""
    try:
        await _HIVEMIND_STEP(self, **kwargs)
    finally:
        if not self._matchmaking.is_looking_for_group:
            _no_group_pending(self._matchmaking).set()


async def _update_leader_queue_periodically(self: PotentialLeaders, key_manager: GroupKeyManager) -> None:
    """PotentialLeaders._update_queue_periodically, reading the would-be leaders from the DHT at most
    once every LEADER_QUEUE_PERIOD seconds (a tenth of the matchmaking time at most)."""
    period = min(LEADER_QUEUE_PERIOD, self.min_matchmaking_time / 10)
    while get_dht_time() < self.search_end_time:
        read_at = time.monotonic()
        leaders = await key_manager.get_averagers(key_manager.current_key, only_active=True)
        assured = get_dht_time() + self.min_matchmaking_time - MAX_DHT_TIME_DISCREPANCY_SECONDS
        self.max_assured_time = max(self.max_assured_time, assured)
        self.leader_queue.clear()
        for peer, expiration in leaders:
            if peer == self.peer_id or (peer, expiration) in self.past_attempts:
                continue
            self.leader_queue.store(peer, expiration, expiration)
            self.max_assured_time = max(self.max_assured_time, expiration - MAX_DHT_TIME_DISCREPANCY_SECONDS)
        self.update_finished.set()
        waits = {asyncio.create_task(self.running.wait()), asyncio.create_task(self.update_triggered.wait())}
        left = self.search_end_time - get_dht_time()
        try:
            await asyncio.wait(waits, timeout=left if math.isfinite(left) else None)
        finally:
            for wait in waits:
                wait.cancel()
        self.update_triggered.clear()
        await asyncio.sleep(max(0.0, read_at + period - time.monotonic()))


def replace_torch_thread_pool() -> None:
    """In a forked process's first thread of torch work: torch's thread pool, replaced before other threads start."""
    torch.set_num_threads(torch.get_num_threads())


def _averager_loop() -> asyncio.AbstractEventLoop:
    """hivemind's switch_to_uvloop, as the averager's process calls it for the loop it serves on,
    with a task factory that holds each task of that loop until it is done (see above)."""
    loop = _HIVEMIND_SWITCH_TO_UVLOOP()
    running: set[asyncio.Task] = set()

    def held_task(loop: asyncio.AbstractEventLoop, coro, context=None) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, context=context)
        running.add(task)
        task.add_done_callback(running.discard)
        return task

    loop.set_task_factory(held_task)
    return loop


async def _shutdown_averager(self: DecentralizedAverager, timeout: float | None) -> None:
    """DecentralizedAverager._shutdown, ending the groups still registered (see above)."""
    if not self.client_mode:
        await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
    for group in self._running_groups.values():
        if not group.done():
            group.cancel()
        elif not group.cancelled() and group.exception() is None:
            group.result().finalize(cancel=True)


def _serve_averager(self: DecentralizedAverager) -> None:
    """DecentralizedAverager._run_internal (the averager's background thread), once torch's thread pool is replaced."""
    replace_torch_thread_pool()
    _HIVEMIND_AVERAGER_SERVE(self)


_logger = logging.getLogger("starling.peer")
_HIVEMIND_CANCEL = StepControl.cancel
_HIVEMIND_REQUEST_EXPIRATION = Matchmaking.get_request_expiration_time
_HIVEMIND_INITIALIZE = state_averager.initialize_optimizer_state_
_HIVEMIND_DHT_RUN = DHT.run
_HIVEMIND_AVERAGER_SERVE = DecentralizedAverager._run_internal
_HIVEMIND_AVERAGER_SHUTDOWN = DecentralizedAverager._shutdown
_HIVEMIND_SWITCH_TO_UVLOOP = averager_module.switch_to_uvloop
_HIVEMIND_PEER_STUB = AllReduceRunner._get_peer_stub
_HIVEMIND_AGGREGATE_PART = DecentralizedAverager.rpc_aggregate_part
_HIVEMIND_LOOK_FOR_GROUP = Matchmaking.look_for_group
_HIVEMIND_JOIN_GROUP = Matchmaking.rpc_join_group
_HIVEMIND_STEP = DecentralizedAverager._step
_HIVEMIND_UPDATE_LEADERS = PotentialLeaders._update_queue_periodically
LEADER_QUEUE_PERIOD = 0.5  # seconds between two reads of the would-be leaders, at most
STREAM_LINGER = 10.0  # seconds a reducer waits for the member to close, when no part timeout is set


def apply() -> None:
    """Install the corrections above into hivemind."""
    StepControl.cancel = _cancel_step
    state_averager.initialize_optimizer_state_ = _initialize_optimizer_state
    Matchmaking.get_request_expiration_time = _request_expiration_time
    DHT.run = _run_dht
    DHT._drop_request = _drop_request
    DecentralizedAverager._run_internal = _serve_averager
    DecentralizedAverager._shutdown = _shutdown_averager
    averager_module.switch_to_uvloop = _averager_loop
    AllReduceRunner._get_peer_stub = _parts_stub
    DecentralizedAverager.rpc_aggregate_part = _aggregate_part
    Matchmaking.look_for_group = _look_for_group
    Matchmaking.rpc_join_group = _join_group
    DecentralizedAverager._step = _step
    PotentialLeaders._update_queue_periodically = _update_leader_queue_periodically


def revert() -> None:
    """Put hivemind's own code back: to measure what the corrections change (benchmarks/rounds.py) and to check it."""
    StepControl.cancel = _HIVEMIND_CANCEL
    state_averager.initialize_optimizer_state_ = _HIVEMIND_INITIALIZE
    Matchmaking.get_request_expiration_time = _HIVEMIND_REQUEST_EXPIRATION
    DHT.run = _HIVEMIND_DHT_RUN
    DecentralizedAverager._run_internal = _HIVEMIND_AVERAGER_SERVE
    DecentralizedAverager._shutdown = _HIVEMIND_AVERAGER_SHUTDOWN
    averager_module.switch_to_uvloop = _HIVEMIND_SWITCH_TO_UVLOOP
    AllReduceRunner._get_peer_stub = _HIVEMIND_PEER_STUB
    DecentralizedAverager.rpc_aggregate_part = _HIVEMIND_AGGREGATE_PART
    Matchmaking.look_for_group = _HIVEMIND_LOOK_FOR_GROUP
    Matchmaking.rpc_join_group = _HIVEMIND_JOIN_GROUP
    DecentralizedAverager._step = _HIVEMIND_STEP
    PotentialLeaders._update_queue_periodically = _HIVEMIND_UPDATE_LEADERS
