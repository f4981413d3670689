"""The peer daemon volunteers run, and its Python API: `from peer import Peer`."""

from peer.peer import Peer, PeerError, PeerOptions, PeerSummary

__all__ = ["Peer", "PeerError", "PeerOptions", "PeerSummary"]
