"""Command-line plumbing shared by starling-peer and starling-coordinator: one-line errors with exit
status 2, defaults from STARLING_<OPTION> environment variables, and one log format."""

from __future__ import annotations

import argparse
import logging
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    """Errors as one line on stderr and exit status 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_or_exit_code(self, argv: list[str] | None) -> argparse.Namespace | int:
        """The parsed arguments, or the exit status when parsing ended the command (--help, an error)."""
        try:
            return self.parse_args(argv)
        except SystemExit as exit_:
            return int(exit_.code or 0)


def env_name(option: str) -> str:
    return "STARLING_" + option.lstrip("-").replace("-", "_").upper()


def env_default(option: str, default=None, kind=str, multiple: bool = False):
    """The option's default as set in the environment (STARLING_<OPTION>), else `default`."""
    raw = os.environ.get(env_name(option))
    if raw is None:
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw.split() if multiple else raw


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def setup_logging(level: str | int = "INFO") -> None:
    """Starling's lines (the `starling` hierarchy) and hivemind's through one handler in one format,
    at `level`. hivemind's own INFO lines (matchmaking chatter, every epoch) show only at DEBUG: at
    INFO and above hivemind is held at WARNING."""
    from hivemind.utils.logging import use_hivemind_log_handler  # here: --help and bad arguments answer at once

    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    use_hivemind_log_handler("nowhere")  # hivemind's records go up to the root handler below
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    logging.getLogger("hivemind").setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    if level > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(hivemind_errors_in_one_line)


def hivemind_errors_in_one_line(record: logging.LogRecord) -> bool:
    """hivemind logs expected failures (a round that found no group, a peer that left mid-stream)
    with their traceback through its own frames, 5 to 20 lines each: above DEBUG, one line with
    the error's type. The peer's events and metrics say what the failure meant for training."""
    if record.name.startswith("hivemind") and record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        record.msg, record.args = f"{record.getMessage()} ({type(error).__name__})", None
        record.exc_info = record.exc_text = None
    return True


def run_config_error(path: str | None, prog: str) -> int | None:
    """Check the run configuration a command was given before its heavy imports (hivemind, the
    DHT): a bad one is reported in one line within a few seconds. Returns the exit status then.
    A path that is not a file is left to the command's own checks of its options."""
    if path is None or not os.path.isfile(path):
        return None
    from peer.run_config import RunConfig, RunConfigError

    try:
        RunConfig.load(path)
    except RunConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return None
