"""The records of 64 peers (benchmarks/records.py's, small): each signed with its peer's own key
and stored in the real DHT, read by a peer's node, the real coordinator and its dashboard in
headless Chromium."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for benchmarks/

from benchmarks.records import measure  # noqa: E402

PEERS = 64


def test_the_coordinator_and_its_dashboard_list_sixty_four_peers(tmp_path):
    """A peer's read of the progress record finds all 64 entries (measure raises otherwise); the
    coordinator's API lists all 64 online; the dashboard's peers table shows 64 rows and its
    leaderboard 64 contributors (measure waits for both)."""
    figures = measure(tmp_path / "records", PEERS, watch=2.0)
    assert figures["listed_online"] == PEERS
    assert figures["page_rows"] == PEERS
