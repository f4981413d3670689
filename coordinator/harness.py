"""Helpers for starting swarms on one machine: the demo, the tests and the benchmarks use them."""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LISTEN_PORTS = range(20000, 32768)  # below Linux's default ephemeral range
_handed_out: set[int] = set()  # by this process, maybe not bound yet by whoever got them


def _ephemeral_ports() -> range:
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on, for a process about to be started with it.

    Drawn outside the kernel's ephemeral range: a port that bind(0) hands out and releases may be
    taken by any outgoing connection (the libp2p daemons open many) before the process binds it,
    whereas a port outside that range is only ever taken by someone asking for it by number."""
    ephemeral = _ephemeral_ports()
    candidates = [port for port in LISTEN_PORTS if port not in ephemeral and port not in _handed_out]
    draw = random.Random()  # seeded from the OS: parallel processes draw independently
    for port in draw.sample(candidates, k=min(200, len(candidates))):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} in {LISTEN_PORTS.start}-{LISTEN_PORTS.stop - 1}")
