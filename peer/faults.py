"""Failures declared for a peer, so that the multi-process tests inject them the same way every
time: the harness gives `Peer(faults=FaultPlan(...))`, and the peer brings each fault about at its
own place (a slow forward pass, a machine lost in the middle of an all-reduce, a reducer abandoned,
a tampered model). What a fault did is written to files in `record_to`, for the test to read.

A peer without a plan (every volunteer's) runs none of this.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking


@dataclass(frozen=True)
class FaultPlan:
    """The faults one peer injects."""

    slow_forward: float = 0.0  # seconds every training forward pass sleeps first: a slow device
    # SIGKILL the peer's whole session (peer, averagers, libp2p daemon: a machine lost) right after
    # it sent its first part in its n-th gradient all-reduce; n goes to died_in_round.txt first.
    die_in_round: int | None = None
    # In its n-th gradient all-reduce, abandon the exchange with one other reducer before sending it
    # anything: that reducer's parts stay the peer's own (a partial round for this peer alone). The
    # fraction the peer should report averaged goes to expected_fraction.txt.
    drop_reducer_in_round: int | None = None
    # Build the model with these config fields changed, keeping the run's configuration: a peer
    # whose model does not match the run's (a tampered client).
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Seconds the averagers' event loop stalls when they assemble a group as leader, before they
    # assemble it: a leader on a loaded machine.
    slow_group_assembly: float = 0.0
    # Seconds the averagers wait before they read each averaged part a reducer sends back: a peer
    # whose process is too busy to read as fast as its reducers send.
    slow_reading: float = 0.0
    # Micro-batches of more sequences than this raise torch.OutOfMemoryError in the forward pass: a
    # device with less free memory than the start-up search found (another program took some).
    memory_for_sequences: int | None = None
    # fp16's loss scale starts here instead of 2^16: so large a scale that the scaled gradients of
    # the first micro-batches overflow, as a model with larger activations would.
    initial_loss_scale: float | None = None
    record_to: str | None = None  # the folder of the files above

    def check_memory(self, sequences: int) -> None:
        """Raise the out-of-memory error a device short of memory would raise for this micro-batch."""
        if self.memory_for_sequences is not None and sequences > self.memory_for_sequences:
            raise torch.OutOfMemoryError(f"out of memory for {sequences} sequences (the fault plan's device)")

    def delay_group_assembly(self, matchmaking: Matchmaking) -> None:
        """Make `matchmaking` (an averager's, in its process) a leader slow to assemble its groups."""
        if self.slow_group_assembly <= 0 or hasattr(matchmaking, "assemble_without_delay"):
            return
        matchmaking.assemble_without_delay = matchmaking.leader_assemble_group
        delay = self.slow_group_assembly

        async def assemble_late() -> GroupInfo:
            time.sleep(delay)  # blocks the loop: nothing else this averager does happens meanwhile
            return await matchmaking.assemble_without_delay()

        matchmaking.leader_assemble_group = assemble_late

    def runner_class(self, base: type[AllReduceRunner]) -> type[AllReduceRunner]:
        """The all-reduce runner class of this peer's gradient averager: `base`, with the faults above."""
        if self.die_in_round is None and self.drop_reducer_in_round is None and not self.slow_reading:
            return base
        plan, record_to = self, Path(self.record_to or ".")

        class FaultyRunner(base):
            rounds = 0  # this averager process's all-reduce rounds so far

            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                FaultyRunner.rounds += 1
                others = [peer for peer in self.ordered_peer_ids if peer != self.peer_id]
                dropping = FaultyRunner.rounds == plan.drop_reducer_in_round and others
                self.dropped = others[0] if dropping else None

            async def _generate_input_for_peer(self, peer_index: int):
                async for message in super()._generate_input_for_peer(peer_index):
                    yield message
                    if plan.die_in_round is not None and FaultyRunner.rounds >= plan.die_in_round:
                        (record_to / "died_in_round.txt").write_text(str(FaultyRunner.rounds))
                        os.killpg(0, signal.SIGKILL)

            def _get_peer_stub(self, peer):
                stub = super()._get_peer_stub(peer)
                if not plan.slow_reading:
                    return stub

                class SlowStub:
                    async def rpc_aggregate_part(self, requests):
                        return read_slowly(await stub.rpc_aggregate_part(requests))

                async def read_slowly(stream):
                    async for message in stream:
                        await asyncio.sleep(plan.slow_reading)
                        yield message

                return SlowStub()

            async def _communicate_with_peer(self, peer_id):
                if peer_id != self.dropped:
                    return await super()._communicate_with_peer(peer_id)
                parts = self.tensor_part_container
                index = self.ordered_peer_ids.index(peer_id)
                dropped = sum(part.numel() for part, _ in parts._input_parts_by_peer[index])
                (record_to / "expected_fraction.txt").write_text(repr(1.0 - dropped / parts.total_size))
                parts.register_failed_reducer(index)
                self.reducer_failures[str(peer_id)] = "dropped by the fault plan"

        return FaultyRunner
