"""Starling's version. Its one source is pyproject.toml's [project].version, read here from the
installed package's metadata."""

from importlib.metadata import version

VERSION: str = version("starling")  # the distribution name in pyproject.toml
