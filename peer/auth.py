"""Access tokens for moderated runs, checked by hivemind's `TokenAuthorizerBase` on every DHT RPC.

The coordinator's RSA identity key is the authority: it signs tokens naming a run, a user and an
expiry, and a peer knows the authority's peer id from the `/p2p/<id>` part of the coordinator's
address. A token is `base64url(payload) + "." + base64url(signature)`, the payload being sorted,
compact JSON `{"exp", "key", "run", "user", "v"}` with the authority's public key in OpenSSH form.

Every DHT node of the run (the coordinator included, with a grant it issues itself for user
"coordinator") is given a `RunAuthorizer`; it sends its grant in each request and response, and
refuses peers whose grant is not signed by its own authority, is for another run, has expired or
names a revoked user.

A grant is a bearer token: it is NOT bound to the key that signs a node's requests, so whoever
holds a copy can use it until it expires. Keep tokens short-lived and private. Revocation is
enforced only by the nodes given the `revoked` set, and the authorizer protects DHT RPCs only,
not the averager's streams.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Container
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import UnsupportedAlgorithm
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time

from peer.identity import peer_id_in_multiaddr, peer_id_of

logger = logging.getLogger("starling.peer")

TOKEN_VERSION = 1


class TokenError(ValueError):
    """An access token that is malformed, forged, expired or not for this run."""


@dataclass(frozen=True)
class Grant:
    """The verified content of an access token."""

    run_id: str
    user: str
    expires_at: float
    authority_key: RSAPublicKey
    payload: bytes
    signature: bytes

    @property
    def authority_peer_id(self) -> str:
        """The libp2p peer id of the key that signed the token."""
        return peer_id_of(self.authority_key)

    @property
    def token(self) -> str:
        """The token text this grant was parsed from."""
        return f"{_encode(self.payload)}.{_encode(self.signature)}"


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_fresh(grant: Grant, now: float) -> None:
    if grant.expires_at <= now:
        when = datetime.fromtimestamp(grant.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise TokenError(f"token for {grant.user!r} expired at {when}")


def issue_token(authority: RSAPrivateKey, run_id: str, user: str, ttl_seconds: float, now: float | None = None) -> str:
    """A token for `user` in run `run_id`, valid for `ttl_seconds` from `now` (default: the current time)."""
    now = time.time() if now is None else now
    key = authority.get_public_key().to_bytes().decode()
    payload = {"v": TOKEN_VERSION, "run": run_id, "user": user, "exp": int(now + ttl_seconds), "key": key}
    payload_bytes = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    signature = base64.b64decode(authority.sign(payload_bytes))
    return f"{_encode(payload_bytes)}.{_encode(signature)}"


def parse_token(text: str, now: float | None = None) -> Grant:
    """The grant in a token whose signature matches the key it names; raises TokenError if it expired by `now`."""
    parts = text.strip().split(".")
    try:
        if len(parts) != 2:
            raise ValueError
        payload_bytes, signature = _decode(parts[0]), _decode(parts[1])
    except (ValueError, binascii.Error):
        raise TokenError("malformed token: expected two base64url parts joined by '.'") from None
    try:
        payload = json.loads(payload_bytes)
    except ValueError:
        raise TokenError("malformed token: the payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("v") != TOKEN_VERSION:
        raise TokenError(f"malformed token: expected a version {TOKEN_VERSION} payload")
    fields = {"run": str, "user": str, "exp": (int, float), "key": str}
    wrong = [
        name
        for name, kind in fields.items()
        if not isinstance(payload.get(name), kind) or isinstance(payload.get(name), bool)
    ]
    if wrong:
        raise TokenError(f"malformed token: missing or mistyped {', '.join(wrong)}")
    try:
        key = RSAPublicKey.from_bytes(payload["key"].encode())
    except (ValueError, UnsupportedAlgorithm):
        raise TokenError("malformed token: 'key' is not an RSA public key in OpenSSH form") from None
    if not key.verify(payload_bytes, base64.b64encode(signature)):
        raise TokenError("bad token signature: the token was altered or not signed by the key it names")
    grant = Grant(
        run_id=payload["run"],
        user=payload["user"],
        expires_at=float(payload["exp"]),
        authority_key=key,
        payload=payload_bytes,
        signature=signature,
    )
    _check_fresh(grant, time.time() if now is None else now)
    return grant


def check_grant_for(grant: Grant, initial_peers: list[str]) -> None:
    """Raises TokenError unless the grant's authority is one of `initial_peers` (by its `/p2p/<id>`)."""
    peer_ids = {peer_id_in_multiaddr(address) for address in initial_peers if "/p2p/" in address}
    if grant.authority_peer_id not in peer_ids:
        raise TokenError(
            f"token was not issued by the coordinator at {', '.join(initial_peers) or '(no address)'}"
            f" (it was signed by peer {grant.authority_peer_id})"
        )


class RunAuthorizer(TokenAuthorizerBase):
    """Signs this node's DHT RPCs with its grant and accepts peers with a valid grant from the same authority.

    `local_private_key` signs this node's requests and responses (default: hivemind's process-wide key);
    users in `revoked` (any container of names, such as coordinator.revocations.RevocationList)
    are refused whatever their token says.
    """

    def __init__(
        self, grant: Grant, local_private_key: RSAPrivateKey | None = None, revoked: Container[str] = frozenset()
    ) -> None:
        super().__init__(local_private_key)
        self.grant = grant
        self.revoked = revoked
        self._authority_key_bytes = grant.authority_key.to_bytes()
        self._expiry_logged = False

    async def get_token(self) -> AccessToken:
        """This node's grant, wrapped for hivemind; raises TokenError (logged once) once it has expired."""
        try:
            _check_fresh(self.grant, get_dht_time())
        except TokenError as error:
            if not self._expiry_logged:
                logger.warning(f"{error}: this node can no longer talk to the run's DHT")
                self._expiry_logged = True
            raise
        return AccessToken(
            username=self.grant.user,
            public_key=self.local_public_key.to_bytes(),
            expiration_time=str(self.grant.expires_at),
            signature=self.grant.token.encode(),
        )

    def is_token_valid(self, access_token: AccessToken) -> bool:
        """Whether a peer's token carries an unexpired, unrevoked grant for this run from this node's authority."""
        try:
            grant = parse_token(access_token.signature.decode(errors="replace"), now=get_dht_time())
            if grant.authority_key.to_bytes() != self._authority_key_bytes:
                raise TokenError(f"token for {grant.user!r} was signed by peer {grant.authority_peer_id}")
            if grant.run_id != self.grant.run_id:
                raise TokenError(f"token for {grant.user!r} is for run {grant.run_id!r}")
            if grant.user != access_token.username:
                raise TokenError(f"token for {grant.user!r} was sent as {access_token.username!r}")
            if grant.user in self.revoked:
                raise TokenError(f"user {grant.user!r} is revoked")
        except TokenError as error:
            logger.debug(f"Refused a peer: {error}")
            return False
        return True

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        """True once the token has expired."""
        return float(access_token.expiration_time) <= get_dht_time()
