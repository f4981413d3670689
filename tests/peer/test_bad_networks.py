"""Peers on bad networks: real peer processes in network namespaces of their own (benchmarks/netlab.py),
with capped bandwidth, a link cut in the middle of training, or behind a NAT router.

The bootstrap DHT node runs in the test's (root) namespace on the lab's bridge address.
"""

import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for benchmarks/

from benchmarks import netlab  # noqa: E402
from coordinator.harness import bootstrap_node, wait_until  # noqa: E402
from peer.faults import FaultPlan  # noqa: E402
from peer.peer import EPOCH_TOLERANCE  # noqa: E402
from peer.run_config import RunConfig  # noqa: E402

NO_LAB = netlab.why_no_lab()
pytestmark = pytest.mark.skipif(NO_LAB is not None, reason=str(NO_LAB))


@pytest.fixture
def lab():
    """A lab of three hosts, removed after the test (its peers are killed before, see lab_peer)."""
    with netlab.Lab(hosts=3) as made:
        yield made


@pytest.fixture
def lab_peer(lab, launch_peer):
    """lab_peer(host, name, run_toml, **launch_peer options) -> a harness peer running in the host's
    namespace, listening on its address and joining through a bootstrap node on the bridge."""
    with bootstrap_node(lab.maddr()) as address:

        def start(host: netlab.Host, name: str, run_toml: Path, **kwargs):
            return launch_peer(
                name,
                wrap=host.command([]),
                host_maddrs=[host.maddr()],
                initial_peers=[address],
                config=str(run_toml),
                **kwargs,
            )

        yield start


def assert_together(peers, atol: float = 5e-3) -> None:
    """Parameters within about one Adam step (lr 1e-3) of each other: state is averaged every epoch."""
    params = [peer.params() for peer in peers]
    for other in params[1:]:
        for key, value in params[0].items():
            torch.testing.assert_close(other[key], value, atol=atol, rtol=0)


def join_after_first_epoch(
    lab_peer, first_host, joiner_host, run_toml, epochs: int, first_slow: float = 0.5, **joiner_options
):
    """A peer on `first_host` trains; once it has taken its first epoch (alone), a second on
    `joiner_host` joins it as volunteers do, loading its state. Peers started together race: the
    first to reach the target batch takes its epoch alone (it counts the others only once they
    report samples) and the two stay an epoch apart. `first_slow` (seconds per forward) keeps the
    first peer from taking epochs alone faster than the joiner downloads its state."""
    first = lab_peer(first_host, "first", run_toml, max_epochs=epochs, faults=FaultPlan(slow_forward=first_slow))
    wait_until(lambda: first.logged_epoch() >= 1, 120, "the first peer's first epoch")
    joiner = lab_peer(joiner_host, "joiner", run_toml, max_epochs=epochs, **joiner_options)
    return first, joiner


def assert_joiner_averaged_every_round(joiner) -> dict:
    summary = joiner.wait(timeout=300)
    joined = next(e["epoch"] for e in joiner.events("joined"))
    assert summary["epoch"] >= joined + 3
    assert summary["samples_contributed"] > 0
    # No round averaged only part of its values, and at most one found nobody to average with: a
    # joiner whose state download took longer than an epoch of the other's catches up through
    # epochs without rounds, and one epoch apart the two peers can miss each other once (or the
    # first leaves before the joiner's last round).
    assert summary["rounds_partial"] == 0
    assert summary["rounds_failed"] <= 1
    assert summary["rounds_succeeded"] >= 2
    return summary


def test_peer_capped_at_20_mbit_trains_with_the_others(tmp_path, write_run_config, lab, lab_peer):
    """A peer with 20 Mbit/s each way joins a peer on an open link and averages every round with it
    through the cap. The tiny model's state (parameters and Adam's moments, 25.5 MB) takes the joiner
    about 11 s to download; the first peer's epochs alone take 25 s (2 s a micro-batch), so the
    state it downloads is still the swarm's when it arrives. With epochs of 13 s (1 s a micro-batch)
    each download was an epoch old on arrival: the joiner loaded state 4 times in 8 epochs,
    contributed 20 of 272 samples and, in a suite, had 2 rounds fail."""
    run_toml = write_run_config(tmp_path, target_batch_size=48)
    capped, open_host, _ = lab.hosts
    lab.cap(capped, mbit=20)
    first, joiner = join_after_first_epoch(lab_peer, open_host, capped, run_toml, epochs=6, first_slow=2.0)
    assert_joiner_averaged_every_round(joiner)
    first.wait(timeout=120)
    uploaded, downloaded = lab.bytes_through(capped)
    assert uploaded > 1e6 and downloaded > 1e6  # the averaging went through the capped link
    assert_together([first, joiner])


def test_peer_cut_off_longer_than_the_averaging_timeout_catches_up(tmp_path, write_run_config, lab, lab_peer):
    """One peer's link goes down for twice the averaging timeout while all three train. The others
    stall only for the round the peer was in (up to the averaging timeout) and go on through epochs
    without it. The cut-off peer does not stop either: its rounds fail and it takes local steps
    alone, so it may come back at the swarm's epoch or behind it. Behind by more than one epoch
    (peer.peer.EPOCH_TOLERANCE), it loads the swarm's state; within it, it takes the swarm's epoch
    and part in the next rounds. Either way it reaches the swarm's epoch, and after an epoch together
    its parameters are the swarm's again (state is averaged every epoch).

    How far behind it was is read from its own epochs: the others' epoch when the link came back is
    not it, since the peer may finish a lone epoch just after that (its failed rounds last the
    averaging timeout, the cut twice that)."""
    run_toml = write_run_config(tmp_path, target_batch_size=48)
    timeout = RunConfig.load(run_toml).averaging.averaging_timeout
    cut_host, *other_hosts = lab.hosts
    cut = lab_peer(cut_host, "cut", run_toml, duration=600)
    others = [lab_peer(host, f"peer{i}", run_toml, duration=600) for i, host in enumerate(other_hosts)]
    everyone = [cut, *others]
    wait_until(lambda: min(peer.logged_epoch() for peer in everyone) >= 1, 120, "every peer training")
    joined = max(peer.logged_epoch() for peer in everyone)  # the first peers may have raced alone
    wait_until(lambda: min(peer.logged_epoch() for peer in everyone) >= joined + 1, 60, "an epoch all together")

    lab.cut(cut_host)
    epoch_at_cut = max(peer.logged_epoch() for peer in others)
    time.sleep(2 * timeout)
    epoch_at_restore = min(peer.logged_epoch() for peer in others)
    lab.restore(cut_host)
    assert epoch_at_restore >= epoch_at_cut + 1, "the others stalled while one peer was cut off"

    swarm_epoch = max(peer.logged_epoch() for peer in others) + 1  # one the others reach with the link back

    def back_with_the_swarm() -> bool:
        # The cut-off peer's own lone epochs count too: it is back once it keeps up with the others.
        epochs = [peer.logged_epoch() for peer in others]
        return cut.logged_epoch() >= max(epochs) - 1 and min(*epochs, cut.logged_epoch()) >= swarm_epoch + 1

    wait_until(back_with_the_swarm, 120, "the cut-off peer back within an epoch of the others")
    # The others may finish a step after the signal; the cut-off peer was back when it was sent.
    others_at_stop = max(peer.logged_epoch() for peer in others)
    for peer in everyone:
        peer.process.send_signal(signal.SIGTERM)
    summaries = {peer.folder.name: peer.wait(timeout=60) for peer in everyone}

    assert summaries["cut"]["rounds_succeeded"] >= 1
    if summaries["cut"]["state_loads"] == 0:
        # Then every round took the group's epoch: at most EPOCH_TOLERANCE ahead of the peer's own,
        # and the round's step on top.
        epochs = [e["epoch"] for e in cut.events("epoch")]
        jump = max(later - earlier for earlier, later in zip(epochs, epochs[1:]))
        assert jump <= EPOCH_TOLERANCE + 1, f"came back {jump - 1} epochs behind without loading state"
    assert summaries["cut"]["epoch"] >= others_at_stop - 1
    for name in ("peer0", "peer1"):
        assert summaries[name]["rounds_succeeded"] >= epoch_at_restore - 1, name
    assert_together(everyone)


@pytest.mark.skipif(netlab.why_no_nat() is not None, reason=str(netlab.why_no_nat()))
def test_peer_behind_a_nat_router_averages_every_round_in_client_mode(tmp_path, write_run_config, lab, lab_peer):
    """A peer on a private network behind a masquerading router (a home network: it reaches the
    others, they cannot reach it) joins in client mode: it opens every connection itself, and
    every one of its rounds averages every value with the peer on an open address."""
    run_toml = write_run_config(tmp_path, target_batch_size=48)
    home = lab.add_host_behind_nat()
    first, joiner = join_after_first_epoch(lab_peer, lab.hosts[0], home, run_toml, epochs=8, client_mode=True)
    assert_joiner_averaged_every_round(joiner)
    first.wait(timeout=120)
    assert_together([first, joiner])
