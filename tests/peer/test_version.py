"""peer.version: the version peers and the coordinator report is pyproject.toml's."""

import tomllib
from pathlib import Path

from peer.version import VERSION


def test_the_reported_version_is_the_one_in_pyproject():
    """VERSION comes from the installed package's metadata, written at install time: after a version
    bump, `make setup` reinstalls (or this fails)."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    assert VERSION == pyproject["project"]["version"]
