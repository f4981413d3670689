"""How a peer counts the run's progress (peer.progress), on real DHT nodes."""

import time

import hivemind
import pytest

from coordinator.harness import LOOPBACK_MADDR, wait_until
from peer.progress import RECORD_PERIOD, RecordPeriod, RunProgressTracker

LOOPBACK = [LOOPBACK_MADDR]
TARGET = 32


@pytest.fixture
def two_nodes():
    first = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=LOOPBACK, start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


def tracker(dht: hivemind.DHT, **options) -> RunProgressTracker:
    return RunProgressTracker(
        dht=dht, prefix="progress-test", target_batch_size=TARGET, min_refresh_period=0.1, start=True, **options
    )


@pytest.mark.parametrize("counts_itself", [True, False])
def test_a_peer_without_a_record_of_its_own_counts_itself(two_nodes, counts_itself):
    """A peer that has just joined or loaded state has no samples, and hivemind stores no record of
    it until it has some (and the others fetch it a refresh period later). It still counts itself
    beside the other peer it sees: counting one peer, hivemind takes the other for "no other peers"
    and steps alone on its own gradients. An auxiliary peer, which never has a record, counts only
    the others, as they count it."""
    other, own = tracker(two_nodes[0]), tracker(two_nodes[1], counts_itself=counts_itself)
    try:
        other.report_local_progress(local_epoch=0, samples_accumulated=8)
        wait_until(lambda: own.global_progress.samples_accumulated == 8, 20, "the other peer's record")
        own.fetched_global_progress_this_epoch.clear()
        wait_until(own.fetched_global_progress_this_epoch.is_set, 20, "another fetch")

        assert own.global_progress.num_peers == (2 if counts_itself else 1)
        assert other.global_progress.num_peers == 1  # the other peer sees no record of this one
    finally:
        own.shutdown()
        other.shutdown()


def test_a_peer_stores_its_progress_at_most_once_per_record_period(two_nodes):
    """hivemind stores a peer's progress record at every micro-batch. Starling holds the stores back
    to one per record period, except the first samples of an epoch and a new epoch, which the others
    count peers and see the run's epoch by: those go out at once. (The period here is an hour, so
    nothing held back can go out during the test.)"""
    hour = RecordPeriod(shortest=3600, longest=3600)
    other, own = tracker(two_nodes[0]), tracker(two_nodes[1], record_period=hour)
    try:
        own.report_local_progress(local_epoch=0, samples_accumulated=4)
        wait_until(lambda: other.global_progress.samples_accumulated == 4, 20, "the first samples' record")

        own.report_local_progress(local_epoch=0, samples_accumulated=8)
        own.report_local_progress(local_epoch=0, samples_accumulated=12)
        for _ in range(2):  # the other peer reads the records again, twice
            other.fetched_global_progress_this_epoch.clear()
            wait_until(other.fetched_global_progress_this_epoch.is_set, 20, "another fetch")
        assert other.global_progress.samples_accumulated == 4

        own.report_local_progress(local_epoch=1, samples_accumulated=0)
        wait_until(lambda: other.global_progress.epoch == 1, 20, "the new epoch's record")
        own.report_local_progress(local_epoch=1, samples_accumulated=4)
        wait_until(lambda: other.global_progress.samples_accumulated == 4, 20, "the new epoch's first samples")
        own.report_local_progress(local_epoch=1, samples_accumulated=8)  # held back, as the stop begins
    finally:
        own.shutdown(timeout=10)
        other.shutdown()
    assert own.shutdown_complete.is_set(), "the reporter's last wake-up was held back"


def test_the_record_period_is_a_share_of_the_last_epoch(two_nodes):
    """A peer stores its records, and reads the run's progress, at most every tenth of its last
    epoch, within 2-15 s: as before until it has timed an epoch (from its first samples, not from
    its start), less often in DiLoCo's long rounds, shorter again after a short epoch (a state
    load's jump)."""
    assert [RECORD_PERIOD.after(seconds) for seconds in (None, 5, 75, 1000)] == [2.0, 2.0, 7.5, 15.0]

    whole = RecordPeriod(shortest=0.1, longest=100, share=1.0)  # the period is the last epoch
    own = tracker(two_nodes[0], record_period=whole)
    try:
        assert own.record_period == own.max_refresh_period == 0.1
        time.sleep(2.0)  # joined, no samples yet
        own.report_local_progress(local_epoch=0, samples_accumulated=4)
        time.sleep(0.5)
        own.report_local_progress(local_epoch=0, samples_accumulated=8)
        own.report_local_progress(local_epoch=1, samples_accumulated=0)
        first = own.last_epoch_seconds
        assert 0.5 <= first < 2.5  # from the first samples on: from its start it would be 2.5 or more
        assert own.record_period == own.max_refresh_period == first

        own.report_local_progress(local_epoch=5, samples_accumulated=0)  # a state load's jump
        assert own.last_epoch_seconds < 0.1 and own.record_period == own.max_refresh_period == 0.1
    finally:
        own.shutdown()
