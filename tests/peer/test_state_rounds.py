"""The state averager reports how its rounds ended, as the peer needs to know whether a state
averaging round brought it back together with the swarm (peer.averager.StateRoundsAverager)."""

import threading
import time
from functools import partial

import hivemind
import pytest
import torch

from peer.averager import RoundOutcome, StateRound
from peer.state_loading import CheckedStateAverager

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MATCHMAKING_TIME, ROUND_TIMEOUT = 2.0, 5.0


@pytest.fixture
def two_averagers():
    first = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=LOOPBACK, start=True)
    averagers = [
        CheckedStateAverager(
            dht=dht,
            optimizer=partial(torch.optim.SGD, lr=0.1),
            params=[torch.nn.Parameter(torch.full((1000,), value))],
            prefix="state_rounds",
            min_matchmaking_time=MATCHMAKING_TIME,
            request_timeout=1.0,
            start=True,
        )
        for dht, value in ((first, 1.0), (second, 3.0))
    ]
    yield averagers
    for averager in averagers:
        if averager.is_alive():
            averager.shutdown()
    first.shutdown()
    second.shutdown()


def average_state(averager) -> None:
    averager.step(averaging_round=True, averaging_opts=dict(timeout=ROUND_TIMEOUT))


def settled(averager, timeout: float) -> list[StateRound]:
    """The outcomes of the averager's rounds, once at least one has ended."""
    deadline = time.monotonic() + timeout
    while not (outcomes := averager.settle_state_rounds()):
        assert time.monotonic() < deadline, "no state averaging round ended"
        time.sleep(0.1)
    return outcomes


def test_a_state_round_with_the_group_succeeds_and_one_alone_fails(two_averagers):
    threads = [threading.Thread(target=average_state, args=(averager,)) for averager in two_averagers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for averager in two_averagers:
        assert averager.main_parameters[0].tolist() == [2.0] * 1000  # the mean, exact in float32
        assert settled(averager, timeout=ROUND_TIMEOUT) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]

    # The other peer has left: the next round finds no group, and says so once it gives up.
    lone, gone = two_averagers
    gone.shutdown()
    average_state(lone)
    assert settled(lone, timeout=2 * ROUND_TIMEOUT) == [StateRound(RoundOutcome.FAILED, group_size=1)]
    assert lone.main_parameters[0].tolist() == [2.0] * 1000
