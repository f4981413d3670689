"""How a peer counts the run's progress (peer.progress), on real DHT nodes."""

import random
import sys
import time
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from coordinator.harness import LOOPBACK_MADDR, CoordinatorProcess, stop_all, wait_until
from peer.identity import peer_id_in_multiaddr, peer_id_of
from peer.progress import (
    RECORD_PERIOD,
    SUMMARY_FROM_PEERS,
    SUMMARY_LIFETIME,
    SUMMARY_STALENESS,
    ProgressSummary,
    RecordPeriod,
    RunProgressTracker,
    summary_key,
)
from peer.run_config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for benchmarks/

from benchmarks.records import RecordWriter  # noqa: E402
from benchmarks.swarm_runs import RunSettings  # noqa: E402

LOOPBACK = [LOOPBACK_MADDR]
TARGET = 32


@pytest.fixture
def two_nodes():
    first = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=LOOPBACK, start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


def tracker(dht: hivemind.DHT, prefix: str = "progress-test", **options) -> RunProgressTracker:
    return RunProgressTracker(
        dht=dht, prefix=prefix, target_batch_size=TARGET, min_refresh_period=0.1, start=True, **options
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


def test_a_peer_alone_takes_the_epoch_once_its_own_samples_reach_the_target(two_nodes):
    """A peer that counts no other takes the epoch when its samples reach the target. hivemind
    takes it once the time it estimated from the peer's speed has passed, which a slow micro-batch
    makes come first: the epoch then held part of the batch. Beside another peer the estimate
    stands, since the other's samples may complete the batch."""
    alone = tracker(two_nodes[0], prefix="alone")
    other, own = tracker(two_nodes[0]), tracker(two_nodes[1])
    try:
        alone.report_local_progress(local_epoch=0, samples_accumulated=TARGET // 2)
        alone.fetch_now()
        with alone.lock_global_progress:  # no read replaces the progress meanwhile
            assert alone.global_progress.num_peers == 1
            alone.global_progress.eta_next_epoch = get_dht_time() - 1.0  # the estimate has passed
            assert not alone.ready_to_update_epoch
            alone.report_local_progress(local_epoch=0, samples_accumulated=TARGET)
            assert alone.ready_to_update_epoch

        # (Trackers of one process sign with one key, so only one of a run's trackers here reports:
        # the records of two would have the same subkey.)
        other.report_local_progress(local_epoch=0, samples_accumulated=TARGET // 4)
        wait_until(lambda: own.global_progress.num_peers == 2, 20, "the other peer's record")
        with own.lock_global_progress:
            own.global_progress.eta_next_epoch = get_dht_time() - 1.0
            assert own.global_progress.samples_accumulated < TARGET and own.ready_to_update_epoch
    finally:
        for peer in (alone, other, own):
            peer.shutdown()


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


def test_the_summary_gives_the_progress_that_every_record_gives(two_nodes):
    """The coordinator's summary of a large swarm's records (peers a few epochs apart, some in
    client mode, stored at different times) gives a reader the run's epoch, samples, peers, clients
    and time to the next epoch that hivemind computes from the records themselves; a summary signed
    by anyone but the coordinator is not read."""
    rng = random.Random(0)
    now = get_dht_time()
    records = [
        LocalTrainingProgress(
            peer_id=index.to_bytes(4, "big"),
            epoch=9 if index == 0 else rng.choice([6, 7, 7, 7]),  # peer 0 is a client ahead of the others
            samples_accumulated=rng.randrange(0, 64),
            samples_per_second=rng.uniform(1.0, 20.0),
            time=now - rng.uniform(0.0, 3.0),
            client_mode=index % 10 == 0,
        )
        for index in range(SUMMARY_FROM_PEERS + 8)
    ]
    coordinator_key = RSAPrivateKey()
    coordinator, impostor = RSASignatureValidator(coordinator_key), RSASignatureValidator(RSAPrivateKey())
    reader = tracker(two_nodes[0], counts_itself=False)  # its own record is the one thing the sums leave out
    reader.target_batch_size = 16384
    reader.read_summaries_from(peer_id_of(coordinator_key.get_public_key()))
    try:
        expires = now + 60
        from_records = reader._parse_swarm_progress_data(
            {record.peer_id: ValueWithExpiration(record.dict(), expires) for record in records}
        )
        summary = ProgressSummary.of(records, get_dht_time()).dict()
        from_summary = reader._progress_from_summary(
            ValueWithExpiration({coordinator.local_public_key: ValueWithExpiration(summary, expires)}, expires)
        )

        assert (from_summary.epoch, from_summary.samples_accumulated) == (
            from_records.epoch,
            from_records.samples_accumulated,
        )
        assert (from_summary.num_peers, from_summary.num_clients) == (len(records), 4)
        assert from_summary.eta_next_epoch == pytest.approx(from_records.eta_next_epoch, abs=0.05)
        assert from_summary.eta_next_epoch - get_dht_time() > 10  # not yet reached, which any two would agree on
        forged = ValueWithExpiration({impostor.local_public_key: ValueWithExpiration(summary, expires)}, expires)
        assert reader._progress_from_summary(forged) is None
    finally:
        reader.shutdown()


def test_a_read_of_the_summary_stops_at_a_fresh_copy_unless_only_another_signers_entry_is_fresh():
    """A peer's read of the summary takes the first copy fresh enough (SUMMARY_STALENESS), here the
    copy its node cached at its last read, instead of every holder's copy. Anyone may sign an entry
    of the summary's record: where the copy that stopped the read holds a fresh entry of someone
    else's and a stale one of the coordinator's, the peer reads every copy again and gets the
    coordinator's latest."""
    coordinator_key, impostor_key = RSAPrivateKey(), RSAPrivateKey()
    signing = RSASignatureValidator(coordinator_key)
    coordinator = hivemind.DHT(host_maddrs=LOOPBACK, record_validators=[signing], start=True)
    peers = coordinator.get_visible_maddrs()
    impostor = hivemind.DHT(
        initial_peers=peers, host_maddrs=LOOPBACK, record_validators=[RSASignatureValidator(impostor_key)], start=True
    )
    # A node that others cannot reach (client mode) stores no record: it holds what it cached of its reads.
    reading = hivemind.DHT(
        initial_peers=peers, client_mode=True, record_validators=[RSASignatureValidator()], start=True
    )
    reader = tracker(reading, counts_itself=False)
    reader.read_summaries_from(peer_id_of(coordinator_key.get_public_key()))
    key = reader.summary_key

    def store(dht: hivemind.DHT, signer: RSAPrivateKey, epoch: int, lasts: float) -> None:
        record = LocalTrainingProgress(
            peer_id=b"peer",
            epoch=epoch,
            samples_accumulated=0,
            samples_per_second=1.0,
            time=get_dht_time(),
            client_mode=False,
        )
        summary = ProgressSummary.of([record], get_dht_time()).dict()
        subkey = RSASignatureValidator(signer).local_public_key
        assert dht.store(key, summary, get_dht_time() + lasts, subkey=subkey)

    def coordinators_epoch(found: ValueWithExpiration) -> int:
        return reader._trusted_summary(found).epoch

    try:
        # The copy cached holds a stale entry of the coordinator's and a fresh one of someone else's.
        store(coordinator, coordinator_key, epoch=1, lasts=SUMMARY_LIFETIME - 2 * SUMMARY_STALENESS)
        store(impostor, impostor_key, epoch=9, lasts=60.0)
        assert coordinators_epoch(reading.get(key, latest=True)) == 1  # now in the reading node's cache
        store(coordinator, coordinator_key, epoch=2, lasts=60.0)
        assert coordinators_epoch(reader._read_summary()) == 2

        # The copy cached holds a fresh entry of the coordinator's.
        store(coordinator, coordinator_key, epoch=3, lasts=120.0)
        assert coordinators_epoch(reading.get(key, latest=True)) == 3
        store(coordinator, coordinator_key, epoch=4, lasts=180.0)
        assert coordinators_epoch(reader._read_summary()) == 3
    finally:
        reader.shutdown()
        for dht in (reading, impostor, coordinator):
            dht.shutdown()


def test_a_peer_of_a_large_swarm_reads_the_coordinators_summary_and_the_records_once_it_stops(tmp_path):
    """With more peers than SUMMARY_FROM_PEERS, a peer told who the coordinator is reads the
    coordinator's summary (one record) instead of every peer's record, and counts every peer at
    their epoch by it; a peer told another signer never reads a summary. Once the coordinator has
    stopped, its summary expires and the peer reads the records again, still counting every peer."""
    peers = SUMMARY_FROM_PEERS + 8
    run_toml = RunSettings(preset="tiny", target_batch_size=64 * peers).write(tmp_path / "run.toml", run_id="summary")
    training_key = RunConfig.load(run_toml).training_key()
    coordinator = CoordinatorProcess(tmp_path / "coordinator", run_toml).start()
    writer = node = None
    trackers = []
    try:
        writer = RecordWriter(peers, "summary", training_key, [coordinator.address])
        node = hivemind.DHT(
            initial_peers=[coordinator.address, *map(str, writer.dht.get_visible_maddrs())],
            host_maddrs=LOOPBACK,
            record_validators=[RSASignatureValidator()],  # the signed summary's, as a peer's node has
            start=True,
        )
        wait_until(lambda: node.get(summary_key(training_key)) is not None, 60, "the coordinator's first summary")
        for signer in (coordinator.address, *map(str, writer.dht.get_visible_maddrs())):
            reader = tracker(node, counts_itself=False, prefix=training_key)
            reader.read_summaries_from(peer_id_in_multiaddr(signer))
            trackers.append(reader)
        told, misled = trackers

        wait_until(lambda: told.reads["summary"] >= 3, 60, "three reads of the summary")
        assert told.reads["records"] == 1  # the first read, which counted the peers
        assert (told.global_progress.num_peers, told.global_progress.epoch) == (peers, 7)
        wait_until(lambda: misled.reads["records"] >= 3, 60, "three reads of the records")
        assert misled.reads["summary"] == 0

        coordinator.stop()
        read_before = told.reads["records"]
        wait_until(lambda: told.reads["records"] >= read_before + 2, 60, "reads of the records again")
        assert (told.global_progress.num_peers, told.global_progress.epoch) == (peers, 7)
    finally:
        for reader in trackers:
            reader.shutdown()
        for dht in (node, writer):
            if dht is not None:
                dht.shutdown()
        stop_all([coordinator])
