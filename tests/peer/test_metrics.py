"""Peers' signed metrics records: what the coordinator reads, and what the DHT refuses to store."""

import time

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from coordinator.harness import LOOPBACK_MADDR
from peer import metrics

RUN_ID = "metrics-test"


def record(name: str) -> metrics.PeerMetrics:
    return metrics.PeerMetrics(
        peer_id=f"id-{name}",
        name=name,
        epoch=3,
        loss=6.5,
        samples_per_second=2.0,
        tokens_per_second=64.0,
        samples_contributed=40,
        device="cpu",
        device_name="cpu",
        micro_batch=4,
        client_mode=False,
        auxiliary=False,
        version="0",
        addresses=[],
        time=time.time(),
    )


def node(*initial_peers: str) -> tuple[hivemind.DHT, RSASignatureValidator]:
    signer = RSASignatureValidator(hivemind.utils.crypto.RSAPrivateKey())
    dht = hivemind.DHT(
        initial_peers=list(initial_peers),
        host_maddrs=[LOOPBACK_MADDR],
        record_validators=[signer, metrics.schema_validator(RUN_ID)],
        start=True,
    )
    return dht, signer


def test_honest_records_are_read_and_forged_or_malformed_ones_are_refused():
    coordinator, _ = node()
    address = str(coordinator.get_visible_maddrs()[0])
    alice, alice_signer = node(address)
    mallory, mallory_signer = node(address)
    try:
        assert metrics.publish(alice, RUN_ID, alice_signer, record("alice")).result()
        # Mallory writes under Alice's key: she cannot sign it, so no node accepts it.
        forged = mallory.store(
            metrics.record_key(RUN_ID),
            subkey=alice_signer.local_public_key,
            value=record("alice-forged").dict(),
            expiration_time=get_dht_time() + 60,
        )
        # Under her own key, but not in the schema (a string where a number belongs).
        malformed = mallory.store(
            metrics.record_key(RUN_ID),
            subkey=mallory_signer.local_public_key,
            value={**record("mallory").dict(), "samples_contributed": "a lot"},
            expiration_time=get_dht_time() + 60,
        )
        assert not forged and not malformed
        assert [r.name for r in metrics.read_all(coordinator, RUN_ID)] == ["alice"]
    finally:
        for dht in (mallory, alice, coordinator):
            dht.shutdown()
