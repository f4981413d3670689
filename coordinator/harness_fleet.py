"""Many harness peers forked from one warmed-up process (coordinator.harness.PeerFleet starts it).

    python -m coordinator.harness_fleet SPEC_JSON...

This process imports torch, hivemind and Starling once, moves every object it holds out of the
garbage collector's reach (a collection in a child would otherwise write to each object's header and
copy its page), then forks one harness peer (coordinator.harness_peer) per SPEC_JSON. The peers share
those pages copy-on-write. Each writes what a harness peer writes into its spec's folder, and its
output into log.txt there; this process writes each peer's process id into `pid` and, once it has
ended, its exit status into `exit_status`. SIGTERM or SIGINT here is passed on to every peer, which
stops as a harness peer does; the exit status is 0 when every peer's was.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import traceback
from pathlib import Path

import numpy as np

from coordinator import harness_peer
from model.prepared import write_atomic


def run_child(spec_path: Path) -> int:
    """The forked peer: its output into its folder's log.txt, its own seeds; returns its exit status."""
    log = os.open(spec_path.parent / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, sys.stdout.fileno())
    os.dup2(log, sys.stderr.fileno())
    os.close(log)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # the peer sets its own once it runs
    np.random.seed()  # Python's random reseeds itself in a forked child; numpy's does not
    try:
        harness_peer.run(spec_path)
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
            return 1
        return done.code or 0
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    specs = [Path(argument) for argument in sys.argv[1:]]
    children: dict[int, Path] = {}
    gc.collect()
    gc.freeze()
    for spec_path in specs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_child(spec_path)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = spec_path.parent
        write_atomic(spec_path.parent / "pid", str(pid).encode())

    def pass_on(signum: int, frame) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    failed = 0
    while children:
        pid, status = os.wait()
        folder = children.pop(pid, None)
        if folder is not None:
            code = os.waitstatus_to_exitcode(status)
            failed += code != 0
            write_atomic(folder / "exit_status", str(code).encode())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
