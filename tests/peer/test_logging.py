"""Starling's log lines: hivemind's through the same handler, one line per event above DEBUG."""

import subprocess
import sys

LOG_A_FAILED_ROUND = """
import logging, sys
from peer.command_line import setup_logging
from hivemind.averaging.partition import AllreduceException
setup_logging(sys.argv[1])
try:
    raise AllreduceException("Averaging step failed: could not find a group")
except AllreduceException as error:
    logging.getLogger("hivemind.averaging.averager").exception(error)
"""


def logged_lines(level: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", LOG_A_FAILED_ROUND, level], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stderr.splitlines()


def test_a_failed_round_logged_by_hivemind_is_one_line_at_info_and_its_traceback_at_debug():
    (line,) = logged_lines("INFO")
    assert line.endswith("Averaging step failed: could not find a group (AllreduceException)")
    assert " hivemind.averaging.averager " in line
    debug = logged_lines("DEBUG")
    assert any(text.startswith("Traceback") for text in debug)
