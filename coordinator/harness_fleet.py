"""Many harness peers forked from one warmed-up process (coordinator.harness.PeerFleet starts it).

    python -m coordinator.harness_fleet SPEC_JSON...

This process imports torch, hivemind and Starling once, moves every object it holds out of the
garbage collector's reach (a collection in a child would otherwise write to each object's header and
copy its page), then forks one harness peer (coordinator.harness_peer) per SPEC_JSON. The peers share
those pages copy-on-write. A peer held at its start line (its spec's hold_until) is forked once fewer
than JOINING_AT_ONCE such peers are still joining. Each writes what a harness peer writes into its
spec's folder, and its output into log.txt there; this process writes each peer's process id into
`pid` and, once it has ended, its exit status into `exit_status`. SIGTERM or SIGINT here is passed
on to every peer, which stops as a harness peer does; the exit status is 0 when every peer's was.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from coordinator import harness_peer
from model.prepared import write_atomic

# Held peers joining at once, at most: peers that all start their DHT node and libp2p daemon together
# outrun hivemind's start-up timeouts on a small machine (of 64 at once on 2 cores, one daemon was not
# up within 15 s); joined peers wait at their start line, so the swarm still starts training together.
JOINING_AT_ONCE = 8
JOIN_WAIT = 300.0  # seconds to wait for one of them to join before the next is forked anyway


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


def wait_for_a_free_place(joining: dict[int, Path], exit_codes: dict[int, int]) -> None:
    """Wait until fewer than JOINING_AT_ONCE of the `joining` children (process id: folder) have
    neither joined (`ready` in their folder) nor exited (their codes go into `exit_codes`), or JOIN_WAIT passed."""
    deadline = time.monotonic() + JOIN_WAIT
    while time.monotonic() < deadline:
        for pid, folder in list(joining.items()):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                exit_codes[pid] = os.waitstatus_to_exitcode(status)
            if ended or (folder / "ready").exists():
                del joining[pid]
        if len(joining) < JOINING_AT_ONCE:
            return
        time.sleep(0.1)


def main() -> None:
    specs = [Path(argument) for argument in sys.argv[1:]]
    children: dict[int, Path] = {}
    joining: dict[int, Path] = {}  # held children that have not yet joined
    exit_codes: dict[int, int] = {}  # of children reaped while others were forked
    gc.collect()
    gc.freeze()
    for spec_path in specs:
        held = json.loads(spec_path.read_text())["hold_until"] is not None
        if held:
            wait_for_a_free_place(joining, exit_codes)
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
        if held:
            joining[pid] = spec_path.parent
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
        if exit_codes:
            pid, code = exit_codes.popitem()
        else:
            pid, status = os.wait()
            code = os.waitstatus_to_exitcode(status)
        folder = children.pop(pid, None)
        if folder is not None:
            failed += code != 0
            write_atomic(folder / "exit_status", str(code).encode())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
