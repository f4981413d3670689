import sys
from pathlib import Path

import pytest

from coordinator.harness import bootstrap_node

sys.path.insert(0, str(Path(__file__).parent))  # the helpers and worker scripts beside the tests


@pytest.fixture
def bootstrap():
    """A plain hivemind DHT node on loopback that peers join through; yields its multiaddr."""
    with bootstrap_node() as address:
        yield address


@pytest.fixture
def start_peer(launch_peer, bootstrap):
    """start_peer(name, run_toml, ...) -> a harness peer (launch_peer), joining through the bootstrap node."""

    def start(name: str, run_toml: Path, **kwargs):
        return launch_peer(name, initial_peers=[bootstrap], config=str(run_toml), **kwargs)

    return start
