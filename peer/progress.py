"""The run's progress as a peer counts it: hivemind's ProgressTracker, counting this peer itself,
leaving out the peers it refuses, and storing its own record less often."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from hivemind.optim.progress_tracker import GlobalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration

OWN_RECORD = b"own"  # the key of this peer's own record among those fetched (which are keyed by public key)


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
        super().__init__(*args, start=False, max_refresh_period=record_period.after(None), **kwargs)
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

    def shutdown(self, timeout: float | None = None) -> None:
        self.should_report_progress.urgent = True  # the reporter's last wake-up is not held back
        super().shutdown(timeout)

    def ignore_peers(self, peer_ids: Iterable[bytes]) -> None:
        """Leave these peers (ids as bytes) out of the run's progress from now on, starting with
        the records fetched last."""
        if frozenset(peer_ids) <= self.ignored_peers:
            return
        self.ignored_peers = self.ignored_peers | frozenset(peer_ids)
        with self.lock_global_progress:
            self.global_progress = self._parse_swarm_progress_data(self._latest_records)

    def fetch_now(self) -> None:
        """Read the run's progress from the DHT now rather than at the next refresh."""
        found = self.dht.get(self.training_progress_key, latest=True)
        metadata = found.value if isinstance(found, ValueWithExpiration) else None
        with self.lock_global_progress:
            self.global_progress = self._parse_swarm_progress_data(metadata)

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
