"""The run's progress as a peer counts it: hivemind's ProgressTracker, leaving out peers it refuses."""

from __future__ import annotations

from collections.abc import Iterable

from hivemind.optim.progress_tracker import GlobalTrainingProgress, ProgressTracker


class RunProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker whose epoch and sample counts leave out ignored peers.

    hivemind takes the run's epoch as the latest epoch any peer reports. A peer whose state was
    refused (a model of another shape running epochs ahead on its own) would keep everyone else
    "behind", loading state again on every step; once ignored, its progress counts for nothing.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.ignored_peers: frozenset[bytes] = frozenset()
        self._latest_records = None
        super().__init__(*args, **kwargs)

    def ignore_peers(self, peer_ids: Iterable[bytes]) -> None:
        """Leave these peers (ids as bytes) out of the run's progress from now on, starting with
        the records fetched last."""
        if frozenset(peer_ids) <= self.ignored_peers:
            return
        self.ignored_peers = self.ignored_peers | frozenset(peer_ids)
        with self.lock_global_progress:
            self.global_progress = self._parse_swarm_progress_data(self._latest_records)

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        self._latest_records = metadata
        if isinstance(metadata, dict) and self.ignored_peers:
            metadata = {
                key: record
                for key, record in metadata.items()
                if not (isinstance(record.value, dict) and record.value.get("peer_id") in self.ignored_peers)
            }
        return super()._parse_swarm_progress_data(metadata)
