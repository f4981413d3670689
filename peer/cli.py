"""starling-peer: join a training run and contribute until stopped.

Every option can also be set through an environment variable: --batch-size is STARLING_BATCH_SIZE,
--client-mode is STARLING_CLIENT_MODE=1, and so on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from peer.command_line import OneLineParser, env_default, setup_logging

PROG = "starling-peer"


def positive_int_or_auto(value: str):
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}")
    return number


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="Each option also reads from STARLING_<OPTION> (e.g. STARLING_INITIAL_PEERS).",
    )
    add = parser.add_argument
    add(
        "--initial-peers",
        nargs="*",
        default=env_default("--initial-peers", [], multiple=True),
        metavar="MULTIADDR",
        help="multiaddrs of peers already in the run (printed by the coordinator)",
    )
    add("--config", default=env_default("--config"), help="run.toml with the run's settings (offline use)")
    add("--device", default=env_default("--device", "auto"), help="auto, cpu or cuda[:N]")
    add(
        "--batch-size",
        type=positive_int_or_auto,
        default=env_default("--batch-size", "auto"),
        help="micro-batch: auto finds the largest that fits the device",
    )
    add("--name", default=env_default("--name"), help="your name on the leaderboard")
    add("--token", default=env_default("--token"), help="access token for a moderated run (from its organiser)")
    add(
        "--client-mode",
        action="store_true",
        default=env_default("--client-mode", False, bool),
        help="behind NAT or a firewall: make only outgoing connections",
    )
    add(
        "--auxiliary",
        action="store_true",
        default=env_default("--auxiliary", False, bool),
        help="help average without computing gradients (a CPU helper)",
    )
    add("--identity", default=env_default("--identity"), help="key file that keeps your peer id across restarts")
    add(
        "--host-maddrs",
        nargs="+",
        default=env_default("--host-maddrs", ["/ip4/0.0.0.0/tcp/0"], multiple=True),
        metavar="MULTIADDR",
        help="addresses to listen on",
    )
    add(
        "--announce-maddrs",
        nargs="+",
        default=env_default("--announce-maddrs", [], multiple=True),
        metavar="MULTIADDR",
        help="public addresses to announce to other peers",
    )
    add("--metrics-port", type=int, default=env_default("--metrics-port"), help="serve Prometheus metrics on this port")
    add("--metrics-host", default=env_default("--metrics-host", "127.0.0.1"), help="address for the metrics server")
    add("--max-epochs", type=int, default=env_default("--max-epochs"), help="stop once the run reaches this epoch")
    add("--duration", type=float, default=env_default("--duration"), help="stop after this many seconds")
    add("--data", default=env_default("--data"), help="train on this text file or folder instead of the run's corpus")
    add(
        "--events",
        default=env_default("--events"),
        help="append what this peer does to this file as JSON lines (joined, epoch, round outcomes, stopped)",
    )
    add("--summary-json", default=env_default("--summary-json"), help="write what this peer did to this file")
    add(
        "--log-level",
        default=env_default("--log-level", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    setup_logging(args.log_level)
    from peer.peer import Peer, PeerError  # heavy imports after the arguments are known good
    from peer.run_config import RunConfigError

    try:
        peer = Peer(
            initial_peers=args.initial_peers,
            config=args.config,
            device=args.device,
            batch_size=args.batch_size,
            name=args.name,
            client_mode=args.client_mode,
            auxiliary=args.auxiliary,
            identity=args.identity,
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            data=args.data,
            token=args.token,
            events=args.events,
        )
        summary = peer.run(duration=args.duration, max_epochs=args.max_epochs)
    except (PeerError, RunConfigError, ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("starling.peer").info("done: %s", json.dumps(summary.as_dict()))
    if args.summary_json:
        with open(args.summary_json + ".tmp", "w") as handle:
            json.dump(summary.as_dict(), handle)
        os.replace(args.summary_json + ".tmp", args.summary_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
