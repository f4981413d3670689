"""Churn: peers join, leave politely and die at random (seeded) while a coordinator watches the run.

The suite runs a short soak; `STARLING_CHURN_SECONDS=600 pytest tests/coordinator/test_churn.py -s`
runs a longer one and prints what happened.
"""

import json
import os
import random
import signal
import time
from pathlib import Path

CHURN_SECONDS = float(os.environ.get("STARLING_CHURN_SECONDS", 90))
MAX_CHURNING_PEERS = 2  # besides the two anchors, which stay throughout


def session_processes(pid: int) -> list[int]:
    """Processes of the session (process group) a process started: itself and its helpers."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _process_group(int(entry.name)) == pid
    ]


def _process_group(pid: int) -> int | None:
    try:
        return int((Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2]).split()[2])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def open_files(pids: list[int]) -> int:
    count = 0
    for pid in pids:
        try:
            count += len(os.listdir(f"/proc/{pid}/fd"))
        except FileNotFoundError:
            pass
    return count


def contributed(events: list[dict]) -> bool:
    """Whether a peer's events say it contributed samples to an epoch."""
    return any(e["samples_contributed"] > 0 for e in events if e["event"] == "epoch")


def leaderboard(state: dict) -> dict[str, int]:
    """Samples by peer name, from the coordinator's state."""
    return {entry["name"]: entry["samples"] for entry in state["leaderboard"]}


def stop_politely(peer, signalled: bool = False) -> dict | None:
    """SIGTERM: a peer that is training finishes its step, reports and exits 0 (its summary is
    returned); one still importing its libraries simply ends (None)."""
    if not signalled:
        peer.process.send_signal(signal.SIGTERM)
    if peer.process.wait(timeout=90) == 0:
        return peer.wait(timeout=0)
    # Killed by the signal: it had not reached Peer.run (which turns SIGTERM into a polite stop).
    assert peer.process.returncode == -signal.SIGTERM and not peer.events(), peer.log_text()[-3000:]
    return None


def test_churn_keeps_training_and_accounts_for_every_peer(tmp_path, write_run_config, coordinator, launch_peer):
    run_toml = write_run_config(tmp_path, target_batch_size=32, checkpoint_every=1000)
    coord = coordinator(run_toml)
    address = coord.address
    anchors = {name: launch_peer(name, initial_peers=[address]) for name in ("anchor0", "anchor1")}
    first = coord.wait_for(lambda s: s["loss"] is not None and s["epoch"] >= 1, 180, "the first epoch")
    coordinator_processes = sorted(session_processes(coord.process.pid))
    coordinator_files = open_files(coordinator_processes)

    chance = random.Random(2026)
    live, polite, killed, joined = {}, [], [], 0
    deadline = time.monotonic() + CHURN_SECONDS
    while time.monotonic() < deadline:
        time.sleep(chance.uniform(6, 15))  # a peer takes 10-20 s here to start and join
        if live and (len(live) >= MAX_CHURNING_PEERS or chance.random() < 0.5):
            name = chance.choice(sorted(live))
            peer = live.pop(name)
            if chance.random() < 0.5:
                summary = stop_politely(peer)
                if summary is not None:
                    polite.append((name, peer, summary))
            else:
                events_before = peer.events()  # what it had contributed a few metrics periods before it died
                time.sleep(5)
                peer.kill()
                killed.append((name, peer, events_before))
        else:
            joined += 1
            live[f"churn{joined}"] = launch_peer(f"churn{joined}", initial_peers=[address])

    last = coord.state()
    final = []  # the peers there at the end, stopped together
    for peer in [*live.values(), *anchors.values()]:
        peer.process.send_signal(signal.SIGTERM)
    for name, peer in [*live.items(), *anchors.items()]:
        summary = stop_politely(peer, signalled=True)
        if summary is not None:
            final.append((name, peer, summary))
    # Every peer that contributed is on the leaderboard (once the coordinator has read the final
    # reports): polite ones with what they reported at the end.
    contributors = [name for name, _, summary in polite + final if summary["samples_contributed"] > 0]
    contributors += [name for name, _, events_before in killed if contributed(events_before)]
    board = leaderboard(
        coord.wait_for(
            lambda state: all(leaderboard(state).get(name, 0) > 0 for name in contributors),
            60,
            f"every contributing peer on the leaderboard: {contributors}",
        )
    )
    figures = dict(
        seconds=CHURN_SECONDS,
        joined=joined,
        left_politely=len(polite),
        killed=len(killed),
        epochs=last["epoch"] - first["epoch"],
        loss=[first["loss"], last["loss"]],
        rounds_succeeded=sum(summary["rounds_succeeded"] for _, _, summary in polite + final),
        rounds_failed=sum(summary["rounds_failed"] for _, _, summary in polite + final),
        leaderboard=board,
    )
    print(json.dumps(figures))

    assert joined >= 3 and killed and polite, "the seeded schedule did not churn"
    assert last["epoch"] > first["epoch"] and last["loss"] < first["loss"]
    assert all(summary["rounds_succeeded"] >= 1 for name, _, summary in final if name in anchors)
    assert any(board.get(name, 0) > 0 for name, _, _ in [*polite, *killed]), "no churning peer contributed"
    # The peers that stayed to the end were on one epoch (one apart at most: each stops after its own step).
    final_epochs = [summary["epoch"] for _, _, summary in final]
    assert max(final_epochs) - min(final_epochs) <= 1
    # Nothing leaked: every peer's helpers went with it, and the coordinator holds what it held before.
    for name, peer, _ in [*polite, *final, *killed]:
        assert not session_processes(peer.process.pid), f"{name} left processes behind"
    assert sorted(session_processes(coord.process.pid)) == coordinator_processes
    assert open_files(coordinator_processes) <= coordinator_files + 8
