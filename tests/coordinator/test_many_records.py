"""The records of 64 peers (benchmarks/records.py's, small): each signed with its peer's own key
and stored in the real DHT with their 5 replicas, read by a peer's node, the real coordinator and
its dashboard in headless Chromium."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for benchmarks/

from benchmarks.records import SUMMARY_WATCH, measure  # noqa: E402
from coordinator.coordinator import POLL_PERIOD  # noqa: E402

PEERS = 64
# An organiser's thin link: 64 peers' records are then read about every 20 s, longer than the
# summary's shortest lifetime (SUMMARY_LIFETIME).
POLL_MBIT = 0.3


def test_the_coordinator_and_its_dashboard_list_sixty_four_peers_and_pace_its_polls(tmp_path):
    """A peer's read of the progress record finds all 64 entries (measure raises otherwise); the
    coordinator's API lists all 64 online; the dashboard's peers table shows 64 rows and its
    leaderboard 64 contributors (measure waits for both). The coordinator's polls download no
    more than coordinator.poll_mbit allows on average: each poll is followed by a wait that makes
    up the time its download takes at that rate; its summary lasts until the next poll's."""
    figures = measure(tmp_path / "records", PEERS, watch=8.0, poll_mbit=POLL_MBIT)
    assert figures["listed_online"] == PEERS
    assert figures["page_rows"] == PEERS
    # From the start of one poll to the next, at least the time of the least download seen.
    period = figures["poll_download_min_bytes"] * 8 / (POLL_MBIT * 1e6)
    assert period > 1.5 * POLL_PERIOD  # the pace is the download's, not the unpaced period's
    assert figures["polls_watched"] <= figures["watched_s"] / period + 1
    assert figures["summary_lifetime_s"] > figures["poll_wait_s"] + figures["poll_max_s"]
    assert figures["poll_wait_exported_s"] > 1.5 * POLL_PERIOD  # Prometheus shows the pace too
    # A tracker reads the summary from the DHT only when its own copy is no longer fresh: at most
    # once per summary stored in the watch, and once more for the first. Each such read costs no
    # more than a read of the latest, which asks every node near the key.
    latest, tracker = (figures["summary_downloads"][way] for way in ("latest", "tracker"))
    from_the_dht = SUMMARY_WATCH / period + 2
    assert tracker["bytes_a_read"] <= latest["bytes_a_read"] * from_the_dht / tracker["reads"]
