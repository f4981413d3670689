"""starling-coordinator: organise a training run (bootstrap, run record, monitor, checkpoints, dashboard).

starling-coordinator --config run.toml                 run the coordinator
starling-coordinator token issue --user NAME --ttl 24h print an access token for a moderated run
starling-coordinator token revoke --user NAME        refuse that user's tokens from now on
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from peer.command_line import OneLineParser, env_default, positive_int, run_config_error, setup_logging

if TYPE_CHECKING:
    from peer.run_config import RunConfig

PROG = "starling-coordinator"
TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    match = TTL.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 30m, 24h or 7d, got {text!r}")
    return float(match.group(1)) * TTL_UNITS[match.group(2)]


def port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number (0-65535), got {text!r}")
    return int(text)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="Each option also reads from STARLING_<OPTION> (e.g. STARLING_CONFIG).",
    )
    add = parser.add_argument
    add(
        "--config",
        default=env_default("--config"),
        required=env_default("--config") is None,
        help="run.toml: the model, data, batch, optimizer, compression, checkpoints and auth of the run",
    )
    add(
        "--host-maddrs",
        nargs="+",
        default=env_default("--host-maddrs", ["/ip4/127.0.0.1/tcp/31337"], multiple=True),
        metavar="MULTIADDR",
        help="where the DHT listens (use /ip4/0.0.0.0/tcp/PORT to accept peers from elsewhere)",
    )
    add(
        "--announce-maddrs",
        nargs="+",
        default=env_default("--announce-maddrs", [], multiple=True),
        metavar="MULTIADDR",
        help="public addresses to give peers (behind NAT or port forwarding)",
    )
    add("--identity", default=env_default("--identity"), help="key file of the coordinator (default: in the state dir)")
    add("--dashboard-host", default=env_default("--dashboard-host", "127.0.0.1"), help="address of the dashboard")
    add("--dashboard-port", type=port, default=env_default("--dashboard-port", "8080"), help="port of the dashboard")
    add("--checkpoint-dir", default=env_default("--checkpoint-dir"), help="default: <state dir>/checkpoints")
    add(
        "--state-dir",
        default=env_default("--state-dir"),
        help="identity, history and checkpoints (default: runs/<run_id>)",
    )
    add("--duration", type=float, default=env_default("--duration"), help="stop after this many seconds")
    add("--events", default=env_default("--events"), help="append what the coordinator does to this JSON-lines file")
    add(
        "--eval-data",
        default=env_default("--eval-data"),
        help="a prepared dataset held out of training (starling-data prepare[-chat]): each checkpoint's loss on it",
    )
    add(
        "--eval-sequences",
        type=positive_int,
        default=env_default("--eval-sequences", "256"),
        help="evaluate on the first N sequences of --eval-data",
    )
    add("--log-level", default=env_default("--log-level", "INFO"), choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def build_token_parser() -> OneLineParser:
    parser = OneLineParser(prog=f"{PROG} token issue", description="Print an access token for a moderated run.")
    add = parser.add_argument
    add("--user", required=True, help="the volunteer's name (shown on the leaderboard of refusals and logs)")
    add("--ttl", type=duration, default="24h", help="how long the token is valid: 90s, 30m, 24h, 7d")
    add(
        "--config", default=env_default("--config"), required=env_default("--config") is None, help="the run's run.toml"
    )
    add("--identity", default=env_default("--identity"), help="the coordinator's key file (default: in the state dir)")
    add("--state-dir", default=env_default("--state-dir"), help="the coordinator's state dir (default: runs/<run_id>)")
    return parser


def issue_token_command(argv: list[str]) -> int:
    args = build_token_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    from peer.auth import issue_token
    from peer.identity import load_or_create_identity
    from peer.run_config import RunConfigError

    try:
        run, state_dir = _run_and_state_dir(args)
        identity = Path(args.identity or state_dir / "identity.key")
        if not identity.is_file():
            raise ValueError(f"identity: {str(identity)!r} does not exist; start the coordinator once first")
        print(issue_token(load_or_create_identity(identity), run.run_id, args.user, ttl_seconds=args.ttl))
    except (RunConfigError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


def build_revoke_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=f"{PROG} token revoke", description="Refuse a user's tokens from now on, also while the coordinator runs."
    )
    add = parser.add_argument
    add("--user", required=True, help="the name the user's tokens were issued to")
    add(
        "--config", default=env_default("--config"), required=env_default("--config") is None, help="the run's run.toml"
    )
    add("--state-dir", default=env_default("--state-dir"), help="the coordinator's state dir (default: runs/<run_id>)")
    return parser


def revoke_token_command(argv: list[str]) -> int:
    args = build_revoke_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    from coordinator.revocations import revoke
    from peer.run_config import RunConfigError

    try:
        _, state_dir = _run_and_state_dir(args)
        if not state_dir.is_dir():
            raise ValueError(f"state dir: {str(state_dir)!r} does not exist; start the coordinator once first")
        added = revoke(state_dir, args.user)
    except (RunConfigError, ValueError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"revoked {args.user!r}" if added else f"{args.user!r} was already revoked")
    return 0


def _run_and_state_dir(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    from peer.run_config import RunConfig

    run = RunConfig.load(args.config)
    return run, Path(args.state_dir or Path("runs") / run.run_id)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        commands = {"issue": issue_token_command, "revoke": revoke_token_command}
        if argv[1:2] == [] or argv[1] not in commands:
            print(
                f"{PROG}: error: expected 'token issue' or 'token revoke', got {' '.join(argv[:2])!r}", file=sys.stderr
            )
            return 2
        return commands[argv[1]](argv[2:])
    args = build_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    if (code := run_config_error(args.config, PROG)) is not None:
        return code
    setup_logging(args.log_level)
    from coordinator.coordinator import Coordinator, CoordinatorError, CoordinatorOptions
    from peer.run_config import RunConfigError

    try:
        coordinator = Coordinator(
            CoordinatorOptions(
                config=args.config,
                host_maddrs=args.host_maddrs,
                announce_maddrs=args.announce_maddrs,
                identity=args.identity,
                dashboard_host=args.dashboard_host,
                dashboard_port=args.dashboard_port,
                checkpoint_dir=args.checkpoint_dir,
                state_dir=args.state_dir,
                events=args.events,
                eval_data=args.eval_data,
                eval_sequences=args.eval_sequences,
            )
        )
        coordinator.run(duration=args.duration)
    except (CoordinatorError, RunConfigError, ValueError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
