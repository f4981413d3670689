"""The run record: the run configuration as the coordinator publishes it in the DHT, signed.

The record lives under one well-known key; its subkey carries the publisher's RSA public key and
hivemind's RSASignatureValidator checks the signature. A peer trusts a record only when that key
is the key of a peer it bootstrapped from: the libp2p peer id in `/p2p/<id>` is the hash of that key,
so nobody else in the DHT can publish a run in the coordinator's name.
"""

from __future__ import annotations

import time

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from peer.identity import peer_id_in_multiaddr, subkey_signer
from peer.run_config import RunConfig, RunConfigError

RUN_KEY = "starling_run"
RECORD_FORMAT = 3  # bumped when peers of an older version could not follow the record
# 2: 8-bit gradients travel in Starling's own blockwise format (peer.codec), which format-1 peers cannot decode
# 3: averaging and progress records live under RunConfig.training_key(), not the bare run id
RECORD_EXPIRATION = 3600.0  # seconds; peers keep serving the record while the coordinator is away
REPUBLISH_PERIOD = 300.0
FETCH_TIMEOUT = 15.0  # seconds a joining peer looks for the run record


class RunRecordMissing(LookupError):
    """No trusted run record was found in the DHT."""


def publish(dht: hivemind.DHT, signer: RSASignatureValidator, run: RunConfig, coordinator: dict) -> bool:
    """Store the signed run record; `coordinator` says where to find the coordinator's services."""
    value = {"format": RECORD_FORMAT, "config": run.to_dict(), "coordinator": coordinator, "published": time.time()}
    return dht.store(
        RUN_KEY, subkey=signer.local_public_key, value=value, expiration_time=get_dht_time() + RECORD_EXPIRATION
    )


def fetch(dht: hivemind.DHT, initial_peers: list[str], timeout: float = FETCH_TIMEOUT) -> tuple[RunConfig, dict]:
    """The run configuration published by one of the initial peers, and its coordinator info.

    Raises RunRecordMissing when none is found within `timeout` seconds (after one look, with 0),
    and RunConfigError when the record is one this peer cannot train (a newer format, or a
    configuration that does not validate).
    """
    trusted = {peer_id_in_multiaddr(address) for address in initial_peers}
    deadline = time.monotonic() + timeout
    while True:
        found = dht.get(RUN_KEY, latest=True)
        records = found.value if found is not None and isinstance(found.value, dict) else {}
        for subkey, entry in records.items():
            if subkey_signer(subkey) not in trusted or not isinstance(entry.value, dict):
                continue
            record = entry.value
            if record.get("format") != RECORD_FORMAT:
                raise RunConfigError(
                    f"the run uses record format {record.get('format')!r}, this peer reads "
                    f"format {RECORD_FORMAT}: install the Starling version the run asks for"
                )
            config = RunConfig.from_dict(record.get("config"), source="the run's published configuration")
            return config, record.get("coordinator") or {}
        if time.monotonic() >= deadline:
            raise RunRecordMissing(
                f"no run configuration signed by {', '.join(sorted(trusted))} was found in the DHT within "
                f"{timeout:.0f} s; check that the coordinator is running (or pass --config run.toml)"
            )
        time.sleep(0.5)
