"""Peers average every round and stay together under the configuration users run.

Every averaging setting here is the shipped default (matchmaking 5 s, averaging timeout 60 s, 8-bit
codec, CenteredClip, state averaged every 5 epochs, the shipped batch and learning rate); only the
model is the tiny one, so that the test runs on two cores.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from swarm_checks import assert_parameters_agree

from coordinator.harness import LOOPBACK_VOLUNTEER, PeerProcess, wait_until
from peer.run_config import RunConfig

# Runs of the two-volunteer test in the suite; STARLING_PAIR_RUNS=10 for the ten in a row.
PAIR_RUNS = int(os.environ.get("STARLING_PAIR_RUNS", "1"))


def shipped_run_config(folder: Path, run_id: str) -> Path:
    path = folder / "run.toml"
    path.write_text(f'run_id = "{run_id}"\n[model]\npreset = "tiny"\n')
    return path


def test_three_peers_average_every_round_and_agree_after_every_epoch(tmp_path, start_peer):
    """A first peer trains; two more join it as volunteers do (loading its state). From the first
    state averaging round after they joined, for 10 epochs, every round of the joiners averages
    every value, and after each epoch that all three reached through a round the three hold the
    same parameters, bit for bit (tests/peer/swarm_checks.py)."""
    run_toml = shipped_run_config(tmp_path, "agreement")
    every = RunConfig.load(run_toml).averaging.average_state_every
    run = RunConfig.load(run_toml)
    epochs = 10
    first = start_peer("first", run_toml, duration=900, snapshots=True)
    wait_until(lambda: first.events("epoch"), 120, "the first peer's first epoch")
    joiners = [start_peer(f"joiner{i}", run_toml, duration=900, snapshots=True) for i in range(2)]
    peers = [first, *joiners]
    joined = max(
        wait_until(lambda peer=peer: [e["epoch"] for e in peer.events("joined")], 120, "joining")[0] for peer in joiners
    )
    averaged = (joined // every + 1) * every  # the first state averaging with all three
    last = averaged + epochs
    # (A peer that loads a state may enter an epoch without an epoch event, and so without its snapshot.)
    wait_until(
        lambda: all(max(e.get("epoch", 0) for e in peer.events()) >= last for peer in peers), 400, f"epoch {last}"
    )
    for peer in peers:
        peer.process.send_signal(signal.SIGTERM)
    for peer in peers:
        peer.wait(timeout=60)

    # A peer whose epoch change came before the others' could go on an epoch apart from them
    # (hivemind moves peers within one epoch of the swarm's along without a round) until it loads
    # their state: the epochs compared are those that every peer reached through a round. A joiner
    # still catching up (its first micro-batches are slow on two busy cores) may enter an epoch by
    # loading the group's state instead of through a round; any other epoch needs rounds that
    # averaged every value.
    for peer in joiners:
        assert not epochs_missed(peer.events(), averaged, last), (peer.folder.name, timeline(peers))
    reached = [{e["epoch"]: e["rounds"] for e in peer.events("epoch")} for peer in peers]
    compared = [
        epoch
        for epoch in range(averaged + 1, last + 1)
        if all(averaged_every_value(rounds.get(epoch, [])) for rounds in reached)
    ]
    assert len(compared) >= epochs // 2, compared
    for epoch in compared:
        assert_parameters_agree([peer.snapshot(epoch) for peer in peers], run, context=(epoch, timeline(peers)))


def averaged_every_value(rounds: list[str]) -> bool:
    """Whether an epoch came through rounds that all averaged every value with a group."""
    return bool(rounds) and set(rounds) == {"succeeded"}


def epochs_missed(events: list[dict], after: int, until: int) -> dict[int, list[str]]:
    """The epochs in (after, until] a peer reached neither through rounds that averaged every value
    nor by taking the swarm's state (a load, or a state round with a group ahead), with the outcomes
    of their rounds."""
    missed, loads = {}, 0
    for event in events:
        if event["event"] != "epoch":
            continue
        taken = event["state_loads"] + event["group_states_taken"]
        loaded, loads = taken > loads, taken
        if after < event["epoch"] <= until and not averaged_every_value(event["rounds"]):
            if event["rounds"] or not loaded:
                missed[event["epoch"]] = event["rounds"]
    return missed


def timeline(peers) -> list[tuple]:
    """Every peer's joins, loads and epochs in time order: what a failure message needs."""
    events = [
        (round(e["time"], 2), peer.folder.name, e["event"], e.get("epoch"), e.get("rounds"), e.get("state_rounds"))
        for peer in peers
        for e in peer.events()
        if e["event"] in ("joined", "state_loaded", "epoch")
    ]
    return sorted(events)


def start_volunteer(folder: Path, run_toml: Path, duration: float, initial_peers: list[str]) -> PeerProcess:
    """`starling-peer --config run.toml` as a volunteer runs it (micro-batch 4 on this machine)."""
    arguments = ["--config", str(run_toml), "--duration", str(duration), *LOOPBACK_VOLUNTEER]
    arguments += ["--initial-peers", *initial_peers] if initial_peers else []
    return PeerProcess.command_line(folder, arguments)


@pytest.mark.parametrize("run", range(PAIR_RUNS))
def test_two_volunteers_average_together_without_stalling(tmp_path, run):
    """Two peers of the tiny model on loopback, started as volunteers start them: the first alone,
    the second a few seconds later through the first's address (target batch 32, micro-batch 4).
    In at least 90% of the epochs both spent in the swarm (from the second's first round) they
    averaged in a group (every value, or part of them in a partial round), and no epoch took longer
    than one matchmaking period beyond the median epoch. With hivemind's cancelled-step race
    (peer/hivemind_fixes.py) about half of such runs stalled for the averaging timeout."""
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(f'run_id = "pair-{run}"\n[model]\npreset = "tiny"\n[training]\ntarget_batch_size = 32\n')
    matchmaking_time = RunConfig.load(run_toml).averaging.matchmaking_time
    first = start_volunteer(tmp_path / "first", run_toml, 55, [])
    address = first.wait_for_event("joined")["addresses"][0]
    time.sleep(3)
    second = start_volunteer(tmp_path / "second", run_toml, 40, [address])
    for peer in (first, second):
        peer.wait(timeout=120)

    events = {peer.name: peer.events() for peer in (first, second)}
    # Both are in the swarm from the second's first round: before it, the first counts it only once
    # it reports samples, and the second may catch up to the first's epoch without a round.
    together_from = next(e["time"] for e in events["second"] if e["event"] == "epoch" and e["rounds"]) - 0.5
    # ... until the last round both reached: a peer's stop begins right after its last epoch, and
    # the other's epochs after that have no partner left.
    together_until = min(max(e["time"] for e in stream if e["event"] == "epoch") for stream in events.values()) + 0.5
    for name, stream in events.items():
        epochs = [e for e in stream if e["event"] == "epoch" and together_from < e["time"] <= together_until]
        # A partial round found its group (peer.averager's warnings name the reducer that ended
        # its stream early: a rarer fault, counted and resynchronised, tests/peer/test_partial_rounds.py).
        averaged = [e for e in epochs if e["rounds"] in (["succeeded"], ["partial"])]
        assert len(epochs) >= 4, (name, epochs)
        assert len(averaged) >= 0.9 * len(epochs), (name, json.dumps(epochs))
        times = [together_from, *(e["time"] for e in epochs)]
        durations = sorted(later - earlier for earlier, later in zip(times, times[1:]))
        median = durations[len(durations) // 2]
        assert durations[-1] <= median + matchmaking_time, (name, durations)
