import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the worker scripts beside the tests

RUN_TOML = """\
run_id = "{run_id}"
[model]
preset = "tiny"
[data]
seq_len = {seq_len}
[training]
target_batch_size = {target_batch_size}
warmup_epochs = 0
lr = {lr}
[averaging]
matchmaking_time = {matchmaking_time}
averaging_timeout = 15.0
compression = "{compression}"
average_state_every = {average_state_every}
"""


@pytest.fixture
def write_run_config():
    """Write a small run.toml for the tiny model; keyword arguments override the defaults."""

    def write(folder: Path, **overrides) -> Path:
        values = dict(run_id=f"test-{folder.name[-12:].replace('_', '-')}", seq_len=32, target_batch_size=64,
                      lr=1e-3, matchmaking_time=2.0, compression="adaptive-8bit", average_state_every=1)
        values.update(overrides)
        path = folder / "run.toml"
        path.write_text(RUN_TOML.format(**values))
        return path

    return write
