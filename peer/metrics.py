"""What a peer reports: signed records in the DHT (for the coordinator) and Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

# hivemind's schema validator works with pydantic's v1 API.
from pydantic.v1 import BaseModel, StrictBool, StrictFloat, StrictInt, StrictStr

from peer.averager import RoundOutcome

METRICS_EXPIRATION = 60.0  # seconds a published record stays in the DHT
ROUND_HELP = {
    RoundOutcome.SUCCEEDED: "Gradient rounds that averaged every value with the group",
    RoundOutcome.PARTIAL: "Gradient rounds that averaged only part of the values (the rest stayed the peer's own)",
    RoundOutcome.FAILED: "Gradient rounds that averaged nothing (no group, an error or a timeout)",
}


class PeerMetrics(BaseModel):
    """One peer's latest figures, stored under {run_id}_metrics, subkey = its signed public key."""

    peer_id: StrictStr
    name: StrictStr
    epoch: StrictInt
    loss: StrictFloat
    samples_per_second: StrictFloat
    tokens_per_second: StrictFloat
    samples_contributed: StrictInt
    device: StrictStr
    device_name: StrictStr
    micro_batch: StrictInt
    precision: StrictStr = "fp32"  # what it trains in (peer.options.PRECISIONS); absent from older peers' records
    objective: StrictStr = "pretrain"  # what it minimises (peer.run_config.OBJECTIVES)
    teacher: StrictStr = ""  # distill: "teacher" (run beside the model) or "top-K" (the data's targets)
    bytes_sent: StrictInt = 0  # of all-reduce messages so far (peer.averager: parts and averages)
    compute_seconds: StrictFloat = 0.0  # spent in forward and backward so far ...
    training_seconds: StrictFloat = 0.0  # ... of these since it began to train
    client_mode: StrictBool
    auxiliary: StrictBool
    version: StrictStr
    # Gradient rounds by outcome (peer.averager.RoundOutcome); absent from records of older peers.
    rounds_succeeded: StrictInt = 0
    rounds_partial: StrictInt = 0
    rounds_failed: StrictInt = 0
    mode: StrictStr = "batch"  # the run's training mode (peer.run_config.MODES)
    inner_steps: StrictInt = 0  # DiLoCo mode: local optimizer steps so far
    addresses: list[StrictStr]  # where others can reach it (empty in client mode)
    time: StrictFloat


class MetricsSchema(BaseModel):
    metrics: dict[BytesWithPublicKey, PeerMetrics]


def record_key(run_id: str) -> str:
    """The DHT key under which every peer of the run stores its metrics record."""
    return f"{run_id}_metrics"


def schema_validator(run_id: str) -> SchemaValidator:
    """The DHT validator that rejects metrics records not of this schema (add it beside the
    RSASignatureValidator that checks their signatures)."""
    return SchemaValidator(MetricsSchema, prefix=run_id)


def publish(dht: hivemind.DHT, run_id: str, signer: RSASignatureValidator, metrics: PeerMetrics):
    """Store this peer's record, signed with its key, in the background; returns the pending future."""
    return dht.store(
        key=record_key(run_id),
        subkey=signer.local_public_key,
        value=metrics.dict(),
        expiration_time=get_dht_time() + METRICS_EXPIRATION,
        return_future=True,
    )


def read_all(dht: hivemind.DHT, run_id: str) -> list[PeerMetrics]:
    """Every valid peer record currently in the DHT (the validators drop forged ones)."""
    found = dht.get(record_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    return [PeerMetrics.parse_obj(entry.value) for entry in found.value.values()]


@dataclass
class PrometheusMetrics:
    """The peer's starling_peer_* metrics in a registry of their own."""

    registry: CollectorRegistry
    samples: Counter
    loss: Gauge
    samples_per_second: Gauge
    epoch: Gauge
    rounds: dict[RoundOutcome, Counter]
    out_of_memory: Counter
    kernel_fallbacks: Gauge
    precision: Info
    loss_scale: Gauge
    fp16_overflows: Counter
    bytes_sent: Counter

    @classmethod
    def create(cls) -> PrometheusMetrics:
        registry = CollectorRegistry()
        metrics = cls(
            registry=registry,
            samples=Counter("starling_peer_samples", "Samples this peer contributed", registry=registry),
            loss=Gauge("starling_peer_loss", "Training loss of the latest micro-batch", registry=registry),
            samples_per_second=Gauge("starling_peer_samples_per_second", "This peer's throughput", registry=registry),
            epoch=Gauge("starling_peer_epoch", "Global epoch this peer is on", registry=registry),
            rounds={
                outcome: Counter(f"starling_peer_averaging_rounds_{outcome.value}", help_text, registry=registry)
                for outcome, help_text in ROUND_HELP.items()
            },
            out_of_memory=Counter(
                "starling_peer_out_of_memory",
                "Micro-batches that ran out of device memory (each halved the micro-batch)",
                registry=registry,
            ),
            kernel_fallbacks=Gauge(
                "starling_peer_kernel_fallbacks",
                "Triton kernels replaced by their PyTorch reference after failing their check on this device",
                registry=registry,
            ),
            precision=Info("starling_peer_precision", "The arithmetic this peer trains in", registry=registry),
            loss_scale=Gauge(
                "starling_peer_loss_scale", "fp16's dynamic loss scale (1 in bf16 and fp32)", registry=registry
            ),
            bytes_sent=Counter(
                "starling_peer_averaging_bytes_sent",
                "Bytes of all-reduce messages sent: parts as a member, averages as a reducer",
                registry=registry,
            ),
            fp16_overflows=Counter(
                "starling_peer_fp16_overflows",
                "fp16 micro-batches skipped because their scaled gradients overflowed (each halved the loss scale)",
                registry=registry,
            ),
        )
        metrics.loss.set(float("nan"))  # no loss until the first micro-batch
        return metrics

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Serve /metrics on host:port (loopback by default); returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
