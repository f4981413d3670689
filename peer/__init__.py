"""The peer daemon volunteers run, and its Python API: `from peer import Peer`.

Names are imported on first use, so that `starling-peer --help` and argument errors answer at once.
"""

_PUBLIC = {"Peer", "PeerError", "PeerOptions", "PeerSummary"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name == "PeerOptions":
        from peer.options import PeerOptions

        return PeerOptions
    if name in _PUBLIC:
        from peer import peer

        return getattr(peer, name)
    raise AttributeError(f"module 'peer' has no attribute {name!r}")
