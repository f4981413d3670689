"""The run's progress as a peer counts it: hivemind's ProgressTracker, counting this peer itself,
leaving out the peers it refuses, storing its own record less often, and reading the coordinator's
summary of every record instead of the records themselves in a large swarm."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration, enter_asynchronously, get_dht_time
from pydantic.v1 import BaseModel, StrictFloat, ValidationError, confloat, conint

from peer.identity import subkey_signer

logger = logging.getLogger("starling.peer")

OWN_RECORD = b"own"  # the key of this peer's own record among those fetched (which are keyed by public key)
# From this many peers on, a peer reads the coordinator's summary rather than every peer's record:
# each of the record's replicas answers every peer's reads in full, N^2 x 880 bytes a second at one
# read a second, which at 32 peers is already a third of a 20 Mbit/s upload (benchmarks/README.md).
SUMMARY_FROM_PEERS = 32


@dataclass(frozen=True)
class RecordPeriod:
    """How often a peer stores its records (progress and metrics) and, at the least, reads the
    run's progress: a share of its last epoch, within bounds. An epoch of batch mode takes seconds,
    a DiLoCo round minutes; with a tenth of it the others still see each peer's count about ten
    times a round (hivemind reads more often as an epoch's end nears, and extrapolates between)."""

    shortest: float = 2.0  # seconds; also before this peer has timed an epoch
    # A quarter of how long a record stays in the DHT (60 s), half of how long the coordinator
    # counts a peer online since its last metrics record (coordinator.swarm.ONLINE_WITHIN).
    longest: float = 15.0
    share: float = 0.1  # of the last epoch

    def after(self, epoch_seconds: float | None) -> float:
        """The period after an epoch of `epoch_seconds` (None: none timed yet)."""
        if epoch_seconds is None:
            return self.shortest
        return min(self.longest, max(self.shortest, self.share * epoch_seconds))


RECORD_PERIOD = RecordPeriod()
# Seconds a progress summary stays in the DHT after the next one is due: no older, when read, than
# a peer's own record may be (stored every 2-15 s), however long the coordinator's poll takes (10 s
# at 32 peers on 2 cores) and its pacing (coordinator.poll_mbit) make the next one wait.
SUMMARY_LIFETIME = RECORD_PERIOD.longest
# A read of the summary ends at the first copy whose successor was due no more than this many
# seconds before (often the copy its node cached at its last read), rather than take every holder's
# copy as a read of the latest does (hivemind's latest=True: 5-6 copies, and every node near the
# summary's key answering with its neighbours: 16 KB a read at 64 peers, benchmarks/README.md).
# The coordinator's next poll may take a little longer than the last.
SUMMARY_STALENESS = 2.0


def summary_expiration(next_due: float) -> float:
    """When a summary expires, given the DHT time by which the coordinator expects to store the
    next (its pacing wait and a poll as long as its last): SUMMARY_LIFETIME later. It lasts past the
    next at any pace, and its expiration tells a reader when it was superseded."""
    return next_due + SUMMARY_LIFETIME


def fresh_summary_expiration(now: float) -> float:
    """The expiration from which on a copy of the summary read at DHT time `now` is fresh enough:
    one whose successor was due SUMMARY_STALENESS seconds before `now` or later."""
    return summary_expiration(next_due=now - SUMMARY_STALENESS)


class ProgressSummary(BaseModel):
    """Every peer's progress record summed into one entry of a fixed size (883 bytes signed, the
    size of one peer's entry), which the coordinator stores once per poll: the sums from which
    hivemind's tracker computes the run's progress, so that N peers read one entry each instead of
    N entries each."""

    time: StrictFloat  # DHT time of the read of the records summed
    epoch: conint(ge=0, strict=True)  # the latest of the peers not in client mode (of all, if all are)
    peers: conint(ge=0, strict=True)
    clients: conint(ge=0, strict=True)
    samples_per_second: confloat(ge=0.0, strict=True)  # of every peer
    samples: conint(ge=0, strict=True)  # accumulated toward `epoch`, as the peers at it reported
    estimated_samples: confloat(ge=0.0, strict=True)  # accumulated toward `epoch` by `time`, extrapolated
    epoch_samples_per_second: confloat(ge=0.0, strict=True)  # of the peers at `epoch`

    @classmethod
    def of(cls, records: Sequence[LocalTrainingProgress], now: float) -> ProgressSummary:
        """The summary of these records at DHT time `now`, as hivemind's tracker would sum them."""
        servers = [record.epoch for record in records if not record.client_mode]
        epoch = max(servers or [record.epoch for record in records] or [0])
        at_epoch = [record for record in records if record.epoch == epoch]
        return cls(
            time=float(now),
            epoch=epoch,
            peers=len(records),
            clients=sum(record.client_mode for record in records),
            samples_per_second=float(sum(record.samples_per_second for record in records)),
            samples=sum(record.samples_accumulated for record in at_epoch),
            estimated_samples=float(
                sum(r.samples_accumulated + max(0.0, now - r.time) * r.samples_per_second for r in at_epoch)
            ),
            epoch_samples_per_second=float(sum(record.samples_per_second for record in at_epoch)),
        )


class ProgressSummarySchema(BaseModel):
    """The summary's DHT record: one entry, signed by the coordinator."""

    progress_summary: dict[BytesWithPublicKey, ProgressSummary | None]


def summary_key(prefix: str) -> str:
    """The DHT key of the summary of the progress records under `{prefix}_progress`."""
    return f"{prefix}_progress_summary"


class HeldReports(threading.Event):
    """hivemind's "store this peer's progress record now" signal, let through at most once per
    `period` seconds unless `urgent` is set. A report held back goes out with the first one after
    the period: the record then holds the latest count."""

    def __init__(self, period: float) -> None:
        super().__init__()
        self.period = period
        self.urgent = False
        self._next = -float("inf")

    def set(self) -> None:
        now = time.monotonic()
        if self.urgent or now >= self._next:
            self._next = now + self.period
            super().set()


class RunProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker whose counts hold this peer's own progress as it is now, and leave
    out ignored peers.

    hivemind counts a peer from the records it fetched from the DHT, its own among them. A peer's
    own record is missing until its first report with samples has been stored and fetched back
    (a refresh period or more later; longer over a slow link): a peer that has just joined or
    loaded state then counts one peer less, and with one other peer hivemind takes that for "no
    other peers" and steps alone on its local gradients, epoch after epoch, instead of averaging.

    hivemind takes the run's epoch as the latest epoch any peer reports. A peer whose state was
    refused (a model of another shape running epochs ahead on its own) would keep everyone else
    "behind", loading state again on every step; once ignored, its progress counts for nothing.

    hivemind stores a peer's record after every micro-batch, and reads the run's progress at least
    every max_refresh_period; this tracker does both at most once per record period
    (report_local_progress), which follows the length of its last epoch (RecordPeriod).

    hivemind has every peer read every peer's record, N^2 entries a read across the swarm. Once told
    who the coordinator is (read_summaries_from) and once it has read SUMMARY_FROM_PEERS records or
    more, this tracker reads the coordinator's ProgressSummary instead, and every record again when
    the summary is missing (the coordinator away or slow), was signed by anyone else, or this peer
    leaves some peers out (the sums cannot). The summary counts this peer as of its last stored
    record, and is up to a poll of the coordinator older than the records: both are extrapolated
    from samples per second, as hivemind extrapolates every record. A read of the summary ends at
    the first copy fresh enough (SUMMARY_STALENESS), often the one its node cached at its last read.
    """

    def __init__(
        self,
        *args,
        counts_itself: bool = True,
        record_period: RecordPeriod = RECORD_PERIOD,
        start: bool = False,
        **kwargs,
    ) -> None:
        """`counts_itself`: False for an auxiliary peer, which reports no progress (it accumulates
        no samples), so that the others never count it either. `record_period`: the least time
        between two stores of this peer's record (except when an epoch starts or this peer's first
        samples of one arrive: see report_local_progress) and the longest between two reads."""
        self.counts_itself = counts_itself
        self.ignored_peers: frozenset[bytes] = frozenset()
        self.record_period_rule = record_period
        self.last_epoch_seconds: float | None = None  # how long this peer's last full epoch took
        self._epoch_began: float | None = None  # at its latest epoch change, or its first samples
        self._latest_records = None
        self.summary_from: str | None = None
        self.reads: Counter[str] = Counter()  # reads of the run's progress so far: "summary", "records"
        self._reads_summary = False
        self._shut_down: concurrent.futures.Future[None] = concurrent.futures.Future()  # ends reads under way
        super().__init__(*args, start=False, max_refresh_period=record_period.after(None), **kwargs)
        self.summary_key = summary_key(self.prefix)
        self.dht.add_validators([SchemaValidator(ProgressSummarySchema, prefix=self.prefix)])
        self.should_report_progress = HeldReports(record_period.after(None))  # before the reporter waits on it
        if start:
            self.start()

    @property
    def record_period(self) -> float:
        """Seconds between two stores of this peer's records now."""
        return self.should_report_progress.period

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        """hivemind's report, whose record goes to the DHT at most once per record period. hivemind
        stores one per micro-batch (13 a second for a DiLoCo peer of the tiny model on 2 cores: most
        of its traffic), and N peers' stores load the record's replicas N times over. Between two
        stores the others extrapolate from the stored samples/s. A new epoch and the first samples
        of one go out at once: the others count this peer, and see it in the run's epoch, from these."""
        previous = self.local_progress
        new_epoch = local_epoch != previous.epoch
        self._time_epochs(new_epoch, samples_accumulated)
        self.should_report_progress.urgent = new_epoch or previous.samples_accumulated == 0
        super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)

    def _time_epochs(self, new_epoch: bool, samples_accumulated: int) -> None:
        """Time this peer's epochs (from its first samples, or the previous epoch change, to the next
        change), and set the record period from the latest. A state load's jump counts as a short
        epoch: the period only gets shorter for it."""
        now = time.monotonic()
        if new_epoch:
            if self._epoch_began is not None:
                self.last_epoch_seconds = now - self._epoch_began
                period = self.record_period_rule.after(self.last_epoch_seconds)
                self.should_report_progress.period = period
                self.max_refresh_period = max(period, self.min_refresh_period)  # hivemind's next read
            self._epoch_began = now
        elif self._epoch_began is None and samples_accumulated > 0:
            self._epoch_began = now

    @property
    def ready_to_update_epoch(self) -> bool:
        """hivemind's test, except for a peer that counts no other: the run's samples are then its
        own, and it takes the epoch once they reach the target. hivemind takes it once the time it
        estimated from the peer's speed has passed, which a slow micro-batch turned into an epoch
        on part of the batch (6 of 96 epochs of a lone peer, half a batch each)."""
        alone = self.counts_itself and self.global_progress.num_peers <= 1
        if alone and self.global_epoch <= self.local_progress.epoch:
            return self.local_progress.samples_accumulated >= self.target_batch_size
        return super().ready_to_update_epoch

    def shutdown(self, timeout: float | None = None) -> None:
        self.should_report_progress.urgent = True  # the reporter's last wake-up is not held back
        if not self._shut_down.done():
            self._shut_down.set_result(None)
        super().shutdown(timeout)

    def ignore_peers(self, peer_ids: Iterable[bytes]) -> None:
        """Leave these peers (ids as bytes) out of the run's progress from now on, starting with
        the records fetched last."""
        if frozenset(peer_ids) <= self.ignored_peers:
            return
        self.ignored_peers = self.ignored_peers | frozenset(peer_ids)
        if self._reads_summary:  # the records fetched last may be long past: read them again
            self._reads_summary = False
            self.fetch_now()
            return
        with self.lock_global_progress:
            self.global_progress = self._parse_swarm_progress_data(self._latest_records)

    def read_summaries_from(self, peer_id: str | None) -> None:
        """Read the progress summaries signed by this peer (the run's coordinator) from now on, in a
        swarm of SUMMARY_FROM_PEERS peers or more; None: only ever every record."""
        self.summary_from = peer_id

    def fetch_now(self) -> None:
        """Read the run's progress from the DHT now rather than at the next refresh."""
        progress = self._read_progress()
        with self.lock_global_progress:
            self.global_progress = progress

    async def _progress_fetcher(self) -> None:
        """hivemind's fetcher: reads the run's progress (as fetch_now) when the last read said to
        (next_fetch_time), until the tracker shuts down."""
        loop = asyncio.get_event_loop()
        while not self.shutdown_triggered.is_set():
            wait = max(0.0, self.global_progress.next_fetch_time - get_dht_time())
            if await loop.run_in_executor(None, self.global_state_updated.wait, wait):
                self.global_state_updated.clear()
                continue
            async with enter_asynchronously(self.lock_global_progress):
                progress = await loop.run_in_executor(None, self._read_progress)
                if self.shutdown_triggered.is_set():
                    break
                self.global_progress = progress
                self.fetched_global_progress_this_epoch.set()

    def _read_progress(self) -> GlobalTrainingProgress:
        """The run's progress from the DHT: the coordinator's summary, or every record (see the
        class docstring)."""
        progress = None
        if self._reads_summary:
            progress = self._progress_from_summary(self._read_summary())
        if progress is None:
            progress = self._progress_from_records(self._get(self.training_progress_key, latest=True))
        return progress

    def _read_summary(self) -> ValueWithExpiration | None:
        """The summary's record as of SUMMARY_STALENESS seconds ago or later: the first copy found
        that fresh, or the latest of all where none is. A read stopped by a fresh entry that is not
        the coordinator's (anyone may sign one) reads them all again."""
        fresh = fresh_summary_expiration(get_dht_time())
        found = self._get(self.summary_key, sufficient_expiration_time=fresh)
        if found is not None and found.expiration_time >= fresh:
            entry = self._coordinator_entry(found)
            if entry is None or entry.expiration_time < fresh:
                found = self._get(self.summary_key, latest=True)
        return found

    def _get(self, key: str, **options) -> ValueWithExpiration | None:
        """The DHT's read of `key` (options: hivemind's DHTNode.get_many_by_id's); None once the
        tracker shuts down, since a DHT shut down during a read never answers it."""
        read = self.dht.get(key, return_future=True, **options)
        concurrent.futures.wait([read, self._shut_down], return_when=concurrent.futures.FIRST_COMPLETED)
        return read.result() if read.done() else None

    def _progress_from_records(self, found: ValueWithExpiration | None) -> GlobalTrainingProgress:
        self.reads["records"] += 1
        metadata = found.value if isinstance(found, ValueWithExpiration) else None
        progress = self._parse_swarm_progress_data(metadata)
        self._choose_source(self.summary_from is not None, progress.num_peers)
        return progress

    def _progress_from_summary(self, found: ValueWithExpiration | None) -> GlobalTrainingProgress | None:
        """The run's progress from the coordinator's summary, as hivemind's _parse_swarm_progress_data
        computes it from the records; None (and every record from now on) without a summary fit to
        use (see the class docstring)."""
        summary = self._trusted_summary(found)
        self._choose_source(summary is not None, summary.peers if summary is not None else 0)
        if not self._reads_summary:
            return None
        self.reads["summary"] += 1
        now, own = get_dht_time(), self.local_progress
        if own.epoch > summary.epoch:  # nobody else has reached this peer's epoch yet, as far as it knows
            epoch, samples, estimated = own.epoch, own.samples_accumulated, float(own.samples_accumulated)
        else:
            epoch, samples = summary.epoch, summary.samples
            estimated = summary.estimated_samples + max(0.0, now - summary.time) * summary.epoch_samples_per_second
        seconds_left = max(0.0, self.target_batch_size - estimated) / (
            summary.samples_per_second + self.performance_ema.eps
        )
        most_peers = max(summary.peers + self.expected_drift_peers, summary.peers * (1 + self.expected_drift_rate))
        next_read = np.clip(seconds_left * summary.peers / most_peers, self.min_refresh_period, self.max_refresh_period)
        return GlobalTrainingProgress(
            epoch,
            samples,
            target_batch_size=self.target_batch_size,
            num_peers=summary.peers,
            num_clients=summary.clients,
            eta_next_epoch=now + seconds_left,
            next_fetch_time=now + float(next_read),
        )

    def _choose_source(self, summary_fit: bool, peers: int) -> None:
        """Read the summary next if `summary_fit` (a signer to trust, or a summary of it read) and the
        last read counted SUMMARY_FROM_PEERS `peers` or more (see the class docstring), else every record."""
        reads_summary = summary_fit and peers >= SUMMARY_FROM_PEERS and not self.ignored_peers
        if reads_summary != self._reads_summary:
            source = "the coordinator's summary" if reads_summary else "every peer's record"
            logger.debug("reading the run's progress from %s (%d peers counted)", source, peers)
        self._reads_summary = reads_summary

    def _coordinator_entry(self, found: ValueWithExpiration | None) -> ValueWithExpiration | None:
        """The entry of the summary's record signed by the coordinator (summary_from), if any."""
        entries = found.value if isinstance(found, ValueWithExpiration) and isinstance(found.value, dict) else {}
        for subkey, entry in entries.items():
            if subkey_signer(subkey) == self.summary_from:
                return entry
        return None

    def _trusted_summary(self, found: ValueWithExpiration | None) -> ProgressSummary | None:
        entry = self._coordinator_entry(found)
        if entry is None or not isinstance(entry.value, dict):
            return None
        try:
            return ProgressSummary.parse_obj(entry.value)
        except ValidationError:
            return None

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        self._latest_records = metadata
        own = self.local_progress
        left_out = self.ignored_peers | {own.peer_id}  # its own record, as fetched, may be stale
        records = {
            key: record
            for key, record in (metadata.items() if isinstance(metadata, dict) else ())
            if not (isinstance(record.value, dict) and record.value.get("peer_id") in left_out)
        }
        if self.counts_itself:
            records[OWN_RECORD] = ValueWithExpiration(own.dict(), own.time + self.metadata_expiration)
        return super()._parse_swarm_progress_data(records)
