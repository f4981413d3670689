"""Failure injection with real peer processes: training goes on, and the model stays correct."""

import time

import pytest
import torch
from swarm_checks import mode_settings

from coordinator.harness import wait_until
from peer.faults import FaultPlan
from peer.run_config import RunConfig


@pytest.mark.parametrize("mode", ["batch", "diloco"])
def test_peer_killed_in_the_middle_of_a_round(tmp_path, write_run_config, start_peer, release_peers, mode):
    run_toml = write_run_config(tmp_path, **mode_settings(mode, 48))
    timeout = RunConfig.load(run_toml).averaging.averaging_timeout
    epochs = 6
    survivors = [start_peer(f"peer{i}", run_toml, max_epochs=epochs, hold=True) for i in range(2)]
    victim = start_peer("victim", run_toml, faults=FaultPlan(die_in_round=2), hold=True)
    release_peers([*survivors, victim])

    assert victim.process.wait(timeout=240) == -9, victim.log_text()[-3000:]
    died_at = time.monotonic()
    assert (victim.folder / "died_in_round.txt").read_text() == "2"
    epoch_at_death = max(peer.logged_epoch() for peer in survivors)

    # Nobody hangs: within the averaging timeout (plus a new round's matchmaking) the survivors
    # have finished or abandoned the round, and their next epoch comes.
    wait_until(
        lambda: max(peer.logged_epoch() for peer in survivors) > epoch_at_death,
        died_at + 4 * timeout - time.monotonic(),
        "an epoch after the peer died",
        period=0.5,
    )
    summaries = [peer.wait(timeout=300) for peer in survivors]

    for summary in summaries:
        assert summary["epoch"] >= epochs > epoch_at_death + 1
        assert summary["rounds_succeeded"] >= epochs - epoch_at_death - 1
    # Parameters stay finite, and state averaging every epoch keeps the survivors together (within
    # about one Adam step, lr 1e-3, from the codec's error on each one's share of the gradient).
    params = [peer.params() for peer in survivors]
    for key, value in params[0].items():
        assert torch.isfinite(value).all() and torch.isfinite(params[1][key]).all(), key
        torch.testing.assert_close(params[1][key], value, atol=5e-3, rtol=0)
