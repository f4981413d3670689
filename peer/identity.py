"""Peer identities: the RSA key in a hivemind identity file, the peer id it stands for, and the
multiaddrs that carry peer ids.

A libp2p peer id is the hash of its public key, so a record signed with the key of the peer a
volunteer bootstrapped from (whose id is in the `/p2p/...` part of the address it was given) can be
trusted to come from that peer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import base58
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.multiaddr import Multiaddr


def _private_key_from_der(der: bytes) -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(der, password=None)
    return key


def load_or_create_identity(path: str | Path) -> RSAPrivateKey:
    """The RSA key stored in a hivemind identity file; creates the file (mode 0400) if it is missing."""
    path = Path(path)
    if not path.exists():
        key = RSAPrivateKey()
        protobuf = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes())
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "wb") as file:
            file.write(protobuf.SerializeToString())
        os.chmod(temporary, 0o400)
        os.replace(temporary, path)
        return key
    try:
        protobuf = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        if protobuf.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        return _private_key_from_der(protobuf.data)
    except Exception as error:
        raise ValueError(f"identity: {str(path)!r} is not a hivemind identity file ({error})") from None


def peer_id_of(public_key: RSAPublicKey) -> str:
    """The base58 libp2p peer id of an RSA public key (as hivemind derives it from an identity file)."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    protobuf = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(protobuf).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def subkey_signer(subkey: object) -> str | None:
    """The peer id of the key that signs a DHT subkey (hivemind's `[owner:<public key>]` mark, which
    RSASignatureValidator checks every signature against); None for an unsigned subkey."""
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey) if isinstance(subkey, bytes) else []
    if len(keys) != 1:
        return None
    try:
        return peer_id_of(RSAPublicKey.from_bytes(keys[0]))
    except ValueError:
        return None


def peer_id_in_multiaddr(address: str) -> str:
    """The peer id in the `/p2p/<id>` part of a multiaddr."""
    return str(PeerID.from_base58(address.rsplit("/p2p/", 1)[1]))


def check_multiaddrs(option: str, addresses: list[str]) -> None:
    """Raise ValueError naming the option and the first address that is not a valid multiaddr."""
    for address in addresses:
        try:
            Multiaddr(address)
        except Exception:
            raise ValueError(f"{option}: {address!r} is not a valid multiaddr") from None
