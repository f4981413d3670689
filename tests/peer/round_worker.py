"""One averager of the round tests in test_hivemind_fixes.py: averages tensors filled with its index
with the other averagers (once, or a given number of rounds), and writes how the rounds went.

Run as a process: round_worker.py INITIAL_PEER INDEX PEERS OUT_FILE SPEC_JSON GO, where the spec may give
client_mode (this averager takes no part as a reducer, as a volunteer behind a NAT),
scheduled_in (seconds from its start at which its round is scheduled, as hivemind.Optimizer
schedules a round for the epoch's expected end; by default the matchmaking time),
trigger_delay (seconds it waits, once its group is found, before it lets the all-reduce begin: a
peer still finishing its micro-batch), rounds (how many it averages, each ROUND_INTERVAL after the
one before; 1 by default), identity (a hivemind identity file for its DHT node), group_key_bits
(the run config's), faults (the fields of a peer.faults.FaultPlan: its averager's
slow_group_assembly and slow_reading are the ones that act here), codec (a run config's
averaging.compression; "none" by default), target_group_size (the run config's), random
(tensors of normal values seeded by the index in place of the index) and leave_in_round (it shuts
its averager down once its all-reduce has begun: a peer stopping in a round; OUT_FILE then gets only
outcome "left", all_reducing (whether the all-reduce still ran as it left) and the averager
process's exitcode). Every uncaught exception of a thread, in its process and in the averager's (a
fork of it), is written to thread_errors.jsonl beside OUT_FILE. Once up it waits at its start line
(coordinator.harness.wait_at_start_line, in the folder of OUT_FILE) until the test releases all PEERS
averagers by creating GO, then looks for a group, and leaves right after its last round.
OUT_FILE gets a JSON object: outcome, fraction, group (size) of its last round, rounds (of each: outcome,
key (its matchmaking key's bits) and group (the members' peer ids)), peer_id, means (of each tensor afterwards),
digest (SHA-256 of the values afterwards), error (their relative L2 distance from the exact mean of
all PEERS averagers' tensors), problems (the failed reducers), dht_requests (those its DHT node
sent, by kind, as harness peers count them).
"""

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import hivemind
import torch
from hivemind.utils.timed_storage import get_dht_time

from coordinator.harness import LOOPBACK_MADDR, wait_at_start_line
from coordinator.harness_peer import DHT_REQUESTS, count_dht_requests
from peer.averager import AggregatingAverager, RoundOutcome, round_outcome
from peer.compression import codec_named
from peer.faults import FaultPlan
from peer.run_config import AveragingSection

MATCHMAKING_TIME = 2.0  # the tests' (tests/conftest.py)
STEP_TIMEOUT = 15.0  # the tests' averaging timeout
ROUND_INTERVAL = 3 * MATCHMAKING_TIME  # seconds between the scheduled times of two rounds
SIZES = (2_048_000, 64, 8192)  # the tiny model's embedding (several parts) and two small tensors


def local_tensors(index: int, random: bool) -> list[torch.Tensor]:
    if not random:
        return [torch.full((size,), float(index)) for size in SIZES]
    generator = torch.Generator().manual_seed(index)
    return [torch.randn(size, generator=generator) for size in SIZES]


def record_thread_errors(path: Path) -> None:
    """Write each uncaught exception of a thread of this process, or of a process it forks later, to `path`."""

    def record(args: threading.ExceptHookArgs) -> None:
        with path.open("a") as file:
            thread = args.thread.name if args.thread else None
            file.write(json.dumps(dict(thread=thread, error=repr(args.exc_value))) + "\n")

    threading.excepthook = record


def main() -> None:
    initial_peer, index, peers, out_file, spec_json, go = sys.argv[1:]
    index, peers, spec = int(index), int(peers), json.loads(spec_json)
    record_thread_errors(Path(out_file).with_name("thread_errors.jsonl"))
    # every other setting as shipped
    averaging = AveragingSection(
        matchmaking_time=MATCHMAKING_TIME,
        target_group_size=spec.get("target_group_size"),
        group_key_bits=spec.get("group_key_bits", 0),
    )
    client_mode = spec.get("client_mode", False)
    dht_requests = count_dht_requests()
    dht = hivemind.DHT(
        initial_peers=[initial_peer],
        host_maddrs=[LOOPBACK_MADDR],
        client_mode=client_mode,
        identity_path=spec.get("identity"),
        start=True,
    )
    random = spec.get("random", False)
    averager = AggregatingAverager(
        local_tensors(index, random),
        dht,
        compression=codec_named(spec.get("codec", "none"), averaging.compression_threshold),
        prefix="round",
        min_matchmaking_time=averaging.matchmaking_time,
        **averaging.matchmaking_options(dht.peer_id.to_bytes()),
        next_chunk_timeout=averaging.part_timeout,
        allreduce_timeout=STEP_TIMEOUT,
        client_mode=client_mode,
        faults=FaultPlan(**spec.get("faults", {})),
        start=True,
    )
    wait_at_start_line(Path(out_file).parent, Path(go))
    released = get_dht_time()
    rounds = []
    for number in range(spec.get("rounds", 1)):
        key = averager.get_group_bits()
        # The first round at its scheduled time, each later one ROUND_INTERVAL after the one before,
        # counted from the release: every averager looks for its next group at the same time.
        scheduled_time = released + spec.get("scheduled_in", MATCHMAKING_TIME) + number * ROUND_INTERVAL
        control = averager.step(wait=False, scheduled_time=scheduled_time, timeout=STEP_TIMEOUT, require_trigger=True)
        while control.stage.name in ("IDLE", "LOOKING_FOR_GROUP") and not control.done():
            time.sleep(0.01)
        time.sleep(spec.get("trigger_delay", 0.0))
        control.allow_allreduce()
        if spec.get("leave_in_round"):
            while control.stage.name == "AWAITING_TRIGGER":
                time.sleep(0.01)
            all_reducing = control.stage.name == "RUNNING_ALLREDUCE"
            averager.shutdown()
            left = dict(outcome="left", all_reducing=all_reducing, exitcode=averager.exitcode)
            Path(out_file).write_text(json.dumps(left))
            dht.shutdown()
            return
        try:
            control.result()
        except Exception:  # round_outcome says how the round ended
            pass
        outcome, fraction = round_outcome(control)
        succeeded_at_all = outcome is not RoundOutcome.FAILED
        members = sorted(map(str, control.result())) if succeeded_at_all else []
        rounds.append(dict(outcome=outcome.value, key=key, group=members))
    with averager.get_tensors() as tensors:
        values = torch.cat([tensor.flatten() for tensor in tensors])
        means = [float(tensor.mean()) for tensor in tensors]
    exact = torch.stack([torch.cat(local_tensors(i, random)) for i in range(peers)]).mean(0)
    result = dict(
        outcome=outcome.value,
        fraction=fraction,
        group=len(control.result()) if succeeded_at_all else 0,
        rounds=rounds,
        peer_id=str(dht.peer_id),
        means=means,
        digest=hashlib.sha256(values.numpy().tobytes()).hexdigest(),
        error=float((values - exact).norm() / exact.norm()),
        problems=control.result().reducer_failures if succeeded_at_all else repr(control.exception()),
        dht_requests=dict(zip(DHT_REQUESTS, dht_requests[:])),
    )
    Path(out_file).write_text(json.dumps(result))
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
