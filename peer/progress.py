"""The run's progress as a peer counts it: hivemind's ProgressTracker, counting this peer itself,
leaving out the peers it refuses, and storing its own record less often."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from hivemind.optim.progress_tracker import GlobalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration

OWN_RECORD = b"own"  # the key of this peer's own record among those fetched (which are keyed by public key)


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

    hivemind stores a peer's record after every micro-batch; this tracker at most once per report
    period (report_local_progress).
    """

    def __init__(
        self, *args, counts_itself: bool = True, report_period: float = 0.0, start: bool = False, **kwargs
    ) -> None:
        """`counts_itself`: False for an auxiliary peer, which reports no progress (it accumulates
        no samples), so that the others never count it either. `report_period`: the least time
        between two stores of this peer's record, except when an epoch starts or this peer's
        first samples of one arrive (see report_local_progress)."""
        self.counts_itself = counts_itself
        self.ignored_peers: frozenset[bytes] = frozenset()
        self._latest_records = None
        super().__init__(*args, start=False, **kwargs)
        self.should_report_progress = HeldReports(report_period)  # before the reporter waits on it
        if start:
            self.start()

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        """hivemind's report, whose record goes to the DHT at most once per report period. hivemind
        stores one per micro-batch (13 a second for a DiLoCo peer of the tiny model on 2 cores: most
        of its traffic), and N peers' stores load the record's replicas N times over. Between two
        stores the others extrapolate from the stored samples/s. A new epoch and the first samples
        of one go out at once: the others count this peer, and see it in the run's epoch, from these."""
        previous = self.local_progress
        self.should_report_progress.urgent = local_epoch != previous.epoch or previous.samples_accumulated == 0
        super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)

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
