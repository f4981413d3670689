"""Users revoked from a moderated run: `<state dir>/revoked.txt`, one user name per line.

`starling-coordinator token revoke --user NAME` adds a name; the coordinator's DHT node refuses
every request carrying a token for a revoked user from then on, also while it runs, so that user
can neither join nor rejoin through it. Tokens stay bearer tokens until they expire: peers that
do not hold this list (everyone but the coordinator) still talk to a revoked user they already
know, so keep tokens short-lived too.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE = "revoked.txt"


def revoke(state_dir: str | Path, user: str) -> bool:
    """Add user to the state dir's revocation list (written atomically); False if already there."""
    if not user or user != user.strip() or "\n" in user:
        raise ValueError(f"user: {user!r} is not a user name")
    path = Path(state_dir) / FILE
    users = read(path)
    if user in users:
        return False
    temporary = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    temporary.write_text("".join(f"{name}\n" for name in sorted(users | {user})))
    os.replace(temporary, path)
    return True


def read(path: Path) -> frozenset[str]:
    try:
        return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return frozenset()


class RevocationList:
    """The revoked users of a state dir, as a container re-read whenever the file changes."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / FILE
        self._stamp: tuple[int, int] | None = None
        self._users: frozenset[str] = frozenset()

    def __contains__(self, user: object) -> bool:
        try:
            status = self.path.stat()
            stamp = (status.st_mtime_ns, status.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._stamp, self._users = stamp, read(self.path)
        return user in self._users
