import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the worker scripts beside the tests


@pytest.fixture
def bootstrap():
    """A plain hivemind DHT node on loopback that peers join through; yields its multiaddr."""
    import hivemind

    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    yield str(dht.get_visible_maddrs()[0])
    dht.shutdown()


@pytest.fixture
def start_peer(launch_peer, bootstrap):
    """start_peer(name, run_toml, ...) -> WorkerPeer, joining through the bootstrap node."""

    def start(name: str, run_toml: Path, **kwargs):
        return launch_peer(name, initial_peers=[bootstrap], config=str(run_toml), **kwargs)

    return start
