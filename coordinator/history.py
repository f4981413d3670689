"""The run's history in an embedded SQLite database: time series and per-contributor totals.

It lives in the coordinator's state dir so the dashboard's charts and the leaderboard survive a
restart of the coordinator. Contributions are counted from the samples each peer reports: a peer
that restarts (its count drops) starts a new session and its earlier samples are kept.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    time REAL PRIMARY KEY, epoch INTEGER, loss REAL, samples_per_second REAL,
    tokens_per_second REAL, active_peers INTEGER
);
CREATE TABLE IF NOT EXISTS contributors (
    peer_id TEXT PRIMARY KEY, name TEXT, kind TEXT, device_name TEXT,
    first_seen REAL, last_seen REAL, samples INTEGER, last_reported INTEGER, online_seconds REAL
);
"""
# A gap longer than this between two sightings of a peer is not counted as time online.
MAX_ONLINE_GAP = 30.0


@dataclass
class Point:
    time: float
    epoch: int
    loss: float | None
    samples_per_second: float
    tokens_per_second: float
    active_peers: int


@dataclass
class Contributor:
    peer_id: str
    name: str
    kind: str
    device_name: str
    first_seen: float
    last_seen: float
    samples: int
    online_seconds: float


class History:
    """Time series and contributors, stored in `path` (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_point(self, point: Point) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?)",
                (
                    point.time,
                    point.epoch,
                    point.loss,
                    point.samples_per_second,
                    point.tokens_per_second,
                    point.active_peers,
                ),
            )

    def points(self, since: float = 0.0, limit: int = 2000) -> list[Point]:
        """The latest `limit` points after `since`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM (SELECT * FROM points WHERE time > ? ORDER BY time DESC LIMIT ?) ORDER BY time",
                (since, limit),
            ).fetchall()
        return [Point(*row) for row in rows]

    def record_sighting(
        self, peer_id: str, name: str, kind: str, device_name: str, samples_reported: int, now: float
    ) -> None:
        """Account for a peer's latest report (its samples since it started, as it counts them)."""
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT last_seen, samples, last_reported, online_seconds FROM contributors WHERE peer_id = ?",
                (peer_id,),
            ).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO contributors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (peer_id, name, kind, device_name, now, now, samples_reported, samples_reported, 0.0),
                )
                return
            last_seen, samples, last_reported, online = row
            gained = samples_reported - last_reported if samples_reported >= last_reported else samples_reported
            gap = now - last_seen
            self._db.execute(
                "UPDATE contributors SET name = ?, kind = ?, device_name = ?, last_seen = ?, samples = ?, "
                "last_reported = ?, online_seconds = ? WHERE peer_id = ?",
                (
                    name,
                    kind,
                    device_name,
                    now,
                    samples + gained,
                    samples_reported,
                    online + (gap if 0 < gap <= MAX_ONLINE_GAP else 0.0),
                    peer_id,
                ),
            )

    def contributors(self) -> list[Contributor]:
        with self._lock:
            rows = self._db.execute(
                "SELECT peer_id, name, kind, device_name, first_seen, last_seen, samples, "
                "online_seconds FROM contributors ORDER BY samples DESC"
            ).fetchall()
        return [Contributor(*row) for row in rows]

    def leaderboard(self) -> list[dict]:
        """Contributors grouped by name, most samples first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, SUM(samples), SUM(online_seconds) FROM contributors "
                "GROUP BY name ORDER BY SUM(samples) DESC"
            ).fetchall()
        return [
            {
                "name": name,
                "samples": samples,
                "online_seconds": online,
                "samples_per_second": samples / online if online > 0 else 0.0,
            }
            for name, samples, online in rows
        ]
