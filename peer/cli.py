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
from dataclasses import MISSING, Field, fields

from peer.command_line import OneLineParser, env_default, run_config_error, setup_logging
from peer.options import PeerOptions

PROG = "starling-peer"


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="Each option also reads from STARLING_<OPTION> (e.g. STARLING_INITIAL_PEERS).",
    )
    for spec in fields(PeerOptions):
        add_option(parser, spec)
    # How long this command runs and what it reports: arguments of Peer.run and of this command.
    add = parser.add_argument
    add("--max-epochs", type=int, default=env_default("--max-epochs"), help="stop once the run reaches this epoch")
    add("--duration", type=float, default=env_default("--duration"), help="stop after this many seconds")
    add("--summary-json", default=env_default("--summary-json"), help="write what this peer did to this file")
    add(
        "--plan",
        action="store_true",
        help="print what the run's model needs on this device (memory, micro-batch, precision) and exit",
    )
    add(
        "--log-level",
        default=env_default("--log-level", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log",
    )
    return parser


def add_option(parser: argparse.ArgumentParser, spec: Field) -> None:
    """The flag of one PeerOptions field: --name-with-dashes, its default from STARLING_<NAME> or the field."""
    flag = "--" + spec.name.replace("_", "-")
    settings = dict(spec.metadata)
    default = spec.default_factory() if spec.default is MISSING else spec.default
    if isinstance(default, bool):
        parser.add_argument(flag, action="store_true", default=env_default(flag, default, bool), **settings)
    elif isinstance(default, list):
        parser.add_argument(flag, default=env_default(flag, default, multiple=True), **settings)
    else:
        parser.add_argument(flag, default=env_default(flag, default), **settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    if (code := run_config_error(args.config, PROG)) is not None:
        return code
    setup_logging(args.log_level)
    from peer.peer import Peer, PeerError  # heavy imports after the arguments are known good
    from peer.run_config import RunConfigError

    try:
        peer = Peer(**{spec.name: getattr(args, spec.name) for spec in fields(PeerOptions)})
        if args.plan:
            memory_plan = peer.plan()
            print("\n".join(memory_plan.lines()))
            return 0 if memory_plan.fits else 1
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
