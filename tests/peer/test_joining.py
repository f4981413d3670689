"""Joining a swarm through an initial peer that is slow to answer, as one busy with a burst of
joiners is (64 peers starting at once on one machine: benchmarks/scale.py)."""

import os
import signal

import hivemind

from coordinator.harness import LOOPBACK_MADDR, wait_until


def test_a_peer_whose_initial_peer_does_not_answer_in_time_tries_again_and_joins(
    tmp_path, write_run_config, launch_peer
):
    """The initial peer's DHT process is stopped (its libp2p daemon still takes the connection, so
    the joiner's ping goes unanswered until hivemind's timeout), then resumed once the joiner says it
    will try again: the joiner joins on a later try (its next, unless that one is also late) and trains."""
    run_toml = write_run_config(tmp_path)
    initial = hivemind.DHT(host_maddrs=[LOOPBACK_MADDR], start=True)
    try:
        address = str(initial.get_visible_maddrs()[0])
        os.kill(initial.pid, signal.SIGSTOP)
        try:
            joiner = launch_peer("joiner", initial_peers=[address], config=str(run_toml), max_epochs=1)
            retried = lambda: joiner.events("join_retry")  # noqa: E731
            retries = wait_until(retried, 120, "the joiner to try again", alive=[joiner])
        finally:
            os.kill(initial.pid, signal.SIGCONT)
        assert retries[0]["attempt"] == 1
        summary = joiner.wait(timeout=120)
        joined = joiner.events("joined")
        assert len(joined) == 1 and joined[0]["time"] > retries[0]["time"] + retries[0]["wait"]
        assert summary["samples_contributed"] > 0
    finally:
        initial.shutdown()
