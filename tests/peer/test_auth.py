"""Access tokens: issuing and parsing, and real hivemind DHT nodes that admit or refuse peers by them."""

import asyncio
import base64
import json
import time
from datetime import UTC, datetime

import hivemind
import pytest
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from coordinator.harness import LOOPBACK_MADDR
from peer.auth import Grant, RunAuthorizer, TokenError, check_grant_for, issue_token, parse_token
from peer.identity import peer_id_of

RUN = "moderated-run"
LOOPBACK = [LOOPBACK_MADDR]


@pytest.fixture(scope="module")
def authority() -> RSAPrivateKey:
    return RSAPrivateKey()


@pytest.fixture(scope="module")
def forger() -> RSAPrivateKey:
    return RSAPrivateKey()


def grant(key: RSAPrivateKey, user: str, ttl: float = 600, run: str = RUN, now: float | None = None) -> Grant:
    """A grant from `key`; with `now` in the past, one that has expired since (parse_token checks it at `now`)."""
    return parse_token(issue_token(key, run, user, ttl, now=now), now=now)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_round_trip(authority):
    now = time.time()
    token = issue_token(authority, RUN, "alice", 3600, now=now)
    parsed = parse_token(token)
    assert (parsed.run_id, parsed.user, parsed.expires_at) == (RUN, "alice", int(now + 3600))
    assert parsed.authority_key.to_bytes() == authority.get_public_key().to_bytes()
    assert parsed.authority_peer_id == peer_id_of(authority.get_public_key())
    assert parsed.token == token
    assert parsed.payload.decode() == json.dumps(json.loads(parsed.payload), sort_keys=True, separators=(",", ":"))
    assert set(json.loads(parsed.payload)) == {"v", "run", "user", "exp", "key"}


def test_tampered_payload_is_refused(authority):
    payload, signature = issue_token(authority, RUN, "alice", 3600).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered = json.dumps({**claims, "user": "mallory"}, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(TokenError, match="^bad token signature: the token was altered"):
        parse_token(f"{b64url(tampered)}.{signature}")


def test_signature_by_another_key_is_refused(authority, forger):
    payload = issue_token(authority, RUN, "alice", 3600).split(".")[0]
    signature = base64.b64decode(forger.sign(base64.urlsafe_b64decode(payload + "==")))
    with pytest.raises(TokenError, match="^bad token signature"):
        parse_token(f"{payload}.{b64url(signature)}")


def test_expired_token_is_refused(authority):
    expiry = datetime(2026, 11, 28, 12, 0, tzinfo=UTC).timestamp()
    token = issue_token(authority, RUN, "alice", 60, now=expiry - 60)
    assert parse_token(token, now=expiry - 1).user == "alice"
    with pytest.raises(TokenError) as caught:
        parse_token(token, now=expiry + 1)
    assert str(caught.value) == "token for 'alice' expired at 2026-11-28 12:00 UTC"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "malformed token: expected two base64url parts"),
        ("hello", "malformed token: expected two base64url parts"),
        ("a.b.c", "malformed token: expected two base64url parts"),
        ("!!!.???", "malformed token: expected two base64url parts"),
        (f"{b64url(b'not json')}.{b64url(b'x')}", "malformed token: the payload is not JSON"),
        (f"{b64url(b'[1]')}.{b64url(b'x')}", "malformed token: expected a version 1 payload"),
        (
            f"{b64url(json.dumps({'v': 1, 'run': 'r', 'user': 7, 'exp': True}).encode())}.{b64url(b'x')}",
            "malformed token: missing or mistyped user, exp, key",
        ),
        (
            f"{b64url(json.dumps({'v': 1, 'run': 'r', 'user': 'u', 'exp': 1, 'key': 'ssh-rsa AAAA'}).encode())}.eA",
            "malformed token: 'key' is not an RSA public key",
        ),
    ],
)
def test_garbage_is_malformed(text, message):
    with pytest.raises(TokenError, match=f"^{message}"):
        parse_token(text)


def test_check_grant_for_the_coordinator_address(authority, forger):
    address = f"/ip4/203.0.113.5/tcp/31337/p2p/{peer_id_of(authority.get_public_key())}"
    check_grant_for(grant(authority, "alice"), ["/ip4/198.51.100.1/tcp/1", address])
    with pytest.raises(TokenError, match=f"^token was not issued by the coordinator at {address} "):
        check_grant_for(grant(forger, "alice"), [address])


def test_authorizer_checks_authority_run_expiry_user_and_revocation(authority, forger):
    judge = RunAuthorizer(grant(authority, "coordinator"), revoked={"eve"})

    def token_of(member: Grant) -> AccessToken:
        return AccessToken(
            username=member.user,
            public_key=judge.local_public_key.to_bytes(),
            expiration_time=str(member.expires_at),
            signature=member.token.encode(),
        )

    assert judge.is_token_valid(asyncio.run(RunAuthorizer(grant(authority, "alice")).get_token()))
    assert not judge.is_token_valid(token_of(grant(forger, "alice")))
    assert not judge.is_token_valid(token_of(grant(authority, "alice", run="another-run")))
    assert not judge.is_token_valid(token_of(grant(authority, "alice", ttl=60, now=time.time() - 3600)))
    assert not judge.is_token_valid(token_of(grant(authority, "eve")))
    assert not judge.is_token_valid(AccessToken())
    impersonation = token_of(grant(authority, "alice"))
    impersonation.username = "bob"
    assert not judge.is_token_valid(impersonation)


def test_expired_grant_cannot_sign(authority):
    expired = RunAuthorizer(grant(authority, "bob", ttl=60, now=time.time() - 3600))
    assert expired.does_token_need_refreshing(AccessToken(expiration_time=str(expired.grant.expires_at)))
    with pytest.raises(TokenError, match="^token for 'bob' expired at "):
        asyncio.run(expired.get_token())


@pytest.fixture(scope="module")
def authority_dht(authority):
    """The coordinator's DHT node, admitting members of RUN by tokens it signed; user 'eve' is revoked."""
    dht = hivemind.DHT(
        host_maddrs=LOOPBACK,
        start=True,
        authorizer=RunAuthorizer(grant(authority, "coordinator"), authority, revoked={"eve"}),
    )
    assert dht.store("x", "from the coordinator", get_dht_time() + 600)
    yield dht
    dht.shutdown()


def join(authority_dht, authorizer: RunAuthorizer | None, **options) -> hivemind.DHT:
    initial_peers = [str(address) for address in authority_dht.get_visible_maddrs()]
    return hivemind.DHT(initial_peers, host_maddrs=LOOPBACK, start=True, authorizer=authorizer, **options)


def test_member_with_a_valid_token_shares_values_both_ways(authority, authority_dht):
    member = join(authority_dht, RunAuthorizer(grant(authority, "alice")))
    try:
        assert member.get("x").value == "from the coordinator"
        assert member.store("from-alice", 7, get_dht_time() + 600)
        assert authority_dht.get("from-alice").value == 7
    finally:
        member.shutdown()


def test_peers_without_a_valid_token_are_refused(authority, forger, authority_dht):
    refused = {
        "forged": RunAuthorizer(grant(forger, "mallory")),
        "expired": RunAuthorizer(grant(authority, "bob", ttl=60, now=time.time() - 3600)),
        "no authorizer": None,
    }
    with pytest.raises(RuntimeError, match="DHTNode bootstrap failed"):
        join(authority_dht, refused["forged"])
    for name, authorizer in refused.items():
        outsider = join(authority_dht, authorizer, ensure_bootstrap_success=False)
        try:
            assert outsider.get("x") is None, name
        finally:
            outsider.shutdown()
    member = join(authority_dht, RunAuthorizer(grant(authority, "alice")))
    try:
        assert member.get("x").value == "from the coordinator"
    finally:
        member.shutdown()


def test_revoked_user_is_refused(authority, authority_dht):
    with pytest.raises(RuntimeError, match="DHTNode bootstrap failed"):
        join(authority_dht, RunAuthorizer(grant(authority, "eve")))


def test_token_that_expires_during_the_run_stops_working(authority, authority_dht):
    carol = grant(authority, "carol", ttl=3)
    member = join(authority_dht, RunAuthorizer(carol))
    try:
        assert member.get("x").value == "from the coordinator"
        time.sleep(max(0.0, carol.expires_at - time.time()) + 0.1)
        assert authority_dht.store("y", "after expiry", get_dht_time() + 600)
        assert member.get("y") is None
    finally:
        member.shutdown()
