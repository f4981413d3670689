"""What a volunteer may choose for their peer, declared once: each option's type, default and help.
`Peer(**options)` takes them as keyword arguments and `starling-peer` as flags (--batch-size,
also STARLING_BATCH_SIZE), both built from PeerOptions. The run itself (model, batch, averaging)
comes from the run configuration, not from here.

This module imports nothing heavy: the command line parses its arguments before torch and
hivemind load.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Precision = Literal["auto", "bf16", "fp16", "fp32"]
PRECISIONS = get_args(Precision)


def positive_int_or_auto(value: str) -> int | str:
    """argparse type of --batch-size: 'auto' or a positive integer."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}")
    return number


def option(default: Any, help: str, **command_line: Any) -> Any:
    """A PeerOptions field: its default, its help, and how the command line parses it (argparse's
    `type`, `metavar`, `nargs`); a list default is copied for each instance."""
    metadata = dict(help=help, **command_line)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PeerOptions:
    """What a volunteer may choose; the run itself comes from the run configuration."""

    initial_peers: list[str] = option(
        [], "multiaddrs of peers already in the run (printed by the coordinator)", metavar="MULTIADDR", nargs="*"
    )
    config: str | None = option(None, "run.toml with the run's settings (offline use)")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    precision: Precision = option(
        "auto",
        "auto: bf16 on GPUs with bf16 arithmetic, fp16 with loss scaling on older GPUs (T4, P100), fp32 on CPU",
        choices=PRECISIONS,
    )
    device_memory_gb: float | None = option(
        None, "GiB of the device this peer may use (default: all of a GPU's; on CPU, no limit)", type=float
    )
    batch_size: int | str = option(
        "auto", "micro-batch: auto finds the largest that fits the device", type=positive_int_or_auto
    )
    name: str | None = option(None, "your name on the leaderboard")
    token: str | None = option(None, "access token for a moderated run (from its organiser)")
    client_mode: bool = option(False, "behind NAT or a firewall: make only outgoing connections")
    auxiliary: bool = option(False, "help average without computing gradients (a CPU helper)")
    identity: str | None = option(None, "key file that keeps your peer id across restarts")
    host_maddrs: list[str] = option(["/ip4/0.0.0.0/tcp/0"], "addresses to listen on", metavar="MULTIADDR", nargs="+")
    announce_maddrs: list[str] = option(
        [], "public addresses to announce to other peers", metavar="MULTIADDR", nargs="+"
    )
    metrics_port: int | None = option(None, "serve Prometheus metrics on this port", type=int)
    metrics_host: str = option("127.0.0.1", "address for the metrics server")
    data: str | None = option(None, "train on this text file or folder instead of the run's corpus")
    data_cache: str | None = option(None, "folder for the run's downloaded dataset (default: ~/.cache/starling)")
    data_cache_mb: int = option(4096, "megabytes of downloaded shards kept beyond the one in use", type=int)
    events: str | None = option(
        None, "append what this peer does to this file as JSON lines (joined, epoch, round outcomes, stopped)"
    )

    def check(self) -> None:
        """Raise ValueError naming the first option a volunteer got wrong."""
        from peer.identity import check_multiaddrs  # hivemind's multiaddr parser: loaded only when checking

        for option_name, addresses in (
            ("initial_peers", self.initial_peers),
            ("host_maddrs", self.host_maddrs),
            ("announce_maddrs", self.announce_maddrs),
        ):
            check_multiaddrs(option_name, addresses)
        for address in self.initial_peers:
            if "/p2p/" not in address:
                raise ValueError(f"initial_peers: {address!r} lacks the /p2p/<peer id> part")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, got {self.batch_size!r}")
        if self.client_mode and self.auxiliary:
            raise ValueError("client_mode and auxiliary exclude each other: an auxiliary peer must be reachable")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be between 1 and 65535, got {self.metrics_port}")
        if self.identity is not None and not Path(self.identity).parent.is_dir():
            raise ValueError(f"identity: folder {str(Path(self.identity).parent)!r} does not exist")
        if self.config is not None and not Path(self.config).is_file():
            raise ValueError(f"config: {self.config!r} is not a file")
        if self.device_memory_gb is not None and not self.device_memory_gb > 0:
            raise ValueError(f"device_memory_gb must be positive, got {self.device_memory_gb}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.data_cache_mb < 0:
            raise ValueError(f"data_cache_mb must be 0 or more, got {self.data_cache_mb}")
        if self.events is not None and not Path(self.events).parent.is_dir():
            raise ValueError(f"events: folder {str(Path(self.events).parent)!r} does not exist")
