"""A swarm of 16 peers on loopback (benchmarks/scale.py's harness, small): peers forked from one
warmed-up process (coordinator.harness.PeerFleet), with the real DHT, matchmaking, all-reduce and
coordinator, and the shipped averaging settings."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for benchmarks/

from benchmarks.scale import run_scale  # noqa: E402

PEERS = 16
EPOCHS = 3


def test_sixteen_peers_all_contribute_average_every_part_and_are_listed(tmp_path):
    """Every peer trains to the last epoch and contributes samples; every gradient round of every
    peer averages every part with its group, up to the last epoch (in its round peers leave as they
    reach it; a peer that caught up with the swarm's epoch has fewer rounds); the coordinator's API
    lists all 16 online at once."""
    result = run_scale(tmp_path, PEERS, EPOCHS, newcomer=False, timeout=900)
    for summary in result["summaries"]:
        assert summary["epoch"] >= EPOCHS
        assert summary["samples_contributed"] > 0, summary["peer_id"]
        rounds = [outcome for epoch in summary["epochs"] if epoch["epoch"] < EPOCHS for outcome in epoch["rounds"]]
        assert rounds and set(rounds) == {"succeeded"}, (summary["peer_id"], rounds)
    assert result["listed"] == PEERS
