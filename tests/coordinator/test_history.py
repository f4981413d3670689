"""The coordinator's SQLite history: contributions across peer restarts and coordinator restarts."""

from coordinator.history import MAX_ONLINE_GAP, History, Point


def test_contributions_survive_peer_and_coordinator_restarts(tmp_path):
    history = History(tmp_path / "history.sqlite3")
    history.record_sighting("peer-a", "alice", "cpu", "cpu", samples_reported=40, now=100.0)
    history.record_sighting("peer-a", "alice", "cpu", "cpu", samples_reported=100, now=102.0)
    history.record_sighting("peer-a", "alice", "cpu", "cpu", samples_reported=30, now=104.0)  # the peer restarted
    history.record_sighting("peer-b", "alice", "gpu", "H200", samples_reported=500, now=104.0)  # same name elsewhere
    history.record_sighting("peer-c", "bob", "cpu", "cpu", samples_reported=10, now=104.0)
    history.record_sighting("peer-c", "bob", "cpu", "cpu", samples_reported=20, now=104.0 + MAX_ONLINE_GAP + 1)
    history.add_point(Point(104.0, 3, 6.5, 10.0, 1280.0, 3))
    history.close()

    reopened = History(tmp_path / "history.sqlite3")
    by_peer = {c.peer_id: c for c in reopened.contributors()}
    assert by_peer["peer-a"].samples == 100 + 30 and by_peer["peer-a"].online_seconds == 4.0
    assert by_peer["peer-c"].samples == 20 and by_peer["peer-c"].online_seconds == 0.0  # a long gap is not online
    board = reopened.leaderboard()
    assert [(e["name"], e["samples"]) for e in board] == [("alice", 630), ("bob", 20)]
    assert reopened.points() == [Point(104.0, 3, 6.5, 10.0, 1280.0, 3)]
    assert reopened.points(since=104.0) == []
