"""What one TCP stream carries between two processes: the yardstick the all-reduce and WAN benchmarks
set their figures against. The two ends may run in lab namespaces (benchmarks.netlab.Host.command).

    python -m benchmarks.link receive ADDRESS        # prints its port, then bytes/s once the sender closes
    python -m benchmarks.link send ADDRESS PORT SECONDS
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20  # bytes per send and receive
Wrap = Callable[[list[str]], list[str]]  # runs a command somewhere (a lab host), or as it is
REPOSITORY = Path(__file__).resolve().parents[1]  # where `-m benchmarks.link` imports from


def receive(address: str) -> None:
    """Listen on a free port of `address` (printed), take one stream, print its bytes per second,
    timed from the connection to the sender's close."""
    with socket.create_server((address, 0)) as server:
        print(server.getsockname()[1], flush=True)
        connection, _ = server.accept()
        buffer, received, started = memoryview(bytearray(CHUNK)), 0, time.perf_counter()
        with connection:
            while count := connection.recv_into(buffer):
                received += count
        print(received / (time.perf_counter() - started), flush=True)


def send(address: str, port: int, seconds: float) -> None:
    """Send zeros to address:port for `seconds`, then close."""
    with socket.create_connection((address, port)) as connection:
        block, until = bytes(CHUNK), time.perf_counter() + seconds
        while time.perf_counter() < until:
            connection.sendall(block)


def stream_bytes_per_second(
    address: str = "127.0.0.1", seconds: float = 3.0, sender: Wrap = list, receiver: Wrap = list
) -> float:
    """Bytes per second of one TCP stream to a receiver listening on `address`, sent for `seconds`;
    `sender` and `receiver` wrap each end's command (to run it in a lab host's namespace)."""
    module = [sys.executable, "-m", "benchmarks.link"]
    listening = subprocess.Popen(
        receiver([*module, "receive", address]), stdout=subprocess.PIPE, text=True, cwd=REPOSITORY
    )
    try:
        port = listening.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"the receiver on {address} did not listen (exit status {listening.wait(timeout=30)})")
        command = sender([*module, "send", address, port, str(seconds)])
        subprocess.run(command, check=True, timeout=seconds + 60, cwd=REPOSITORY)
        return float(listening.communicate(timeout=30)[0])
    finally:
        listening.kill()


if __name__ == "__main__":
    role, arguments = sys.argv[1], sys.argv[2:]
    if role == "receive":
        receive(*arguments)
    else:
        send(arguments[0], int(arguments[1]), float(arguments[2]))
