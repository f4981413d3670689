"""The coordinator's Prometheus metrics (starling_*), computed from its latest view of the swarm."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from coordinator.swarm import KINDS, ROUND_OUTCOMES

TOP_CONTRIBUTORS = 10  # per-contributor series beyond these are summed into name="other"
OPTIONAL_GAUGES = (  # (name, help, key of the state): exported once the state has a value
    ("starling_loss", "Training loss, weighted by the peers' speed", "loss"),
    (
        "starling_coordinator_poll_seconds",
        "Seconds the coordinator's latest read of the swarm's records took",
        "poll_seconds",
    ),
    (
        "starling_coordinator_poll_wait_seconds",
        "Seconds the coordinator waits after its latest read before the next: 1, or more to keep its reads "
        "within coordinator.poll_mbit",
        "poll_wait_seconds",
    ),
    (
        "starling_coordinator_poll_download_bytes",
        "Bytes the coordinator's DHT node received during its latest read of the swarm's records",
        "poll_download_bytes",
    ),
)


class SwarmCollector:
    """A prometheus_client collector reading the coordinator's snapshot when scraped.

    `snapshot()` returns the dict served as /api/v1/state.
    """

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def collect(self):
        state = self._snapshot()
        yield GaugeMetricFamily("starling_epoch", "Global epoch of the run", value=state["epoch"])
        active = GaugeMetricFamily(
            "starling_active_peers", "Peers reporting in the last seconds, by kind", labels=["kind"]
        )
        for kind in KINDS:
            active.add_metric([kind], state["active_peers"][kind])
        yield active
        rounds = GaugeMetricFamily(
            "starling_averaging_rounds",
            "Gradient rounds of the peers reporting now, by outcome: succeeded (every value "
            "averaged), partial (only part), failed (none)",
            labels=["outcome"],
        )
        for outcome in ROUND_OUTCOMES:
            rounds.add_metric([outcome], state["rounds"][outcome])
        yield rounds
        yield CounterMetricFamily(
            "starling_samples", "Samples contributed by all peers since the run began", value=state["samples_total"]
        )
        yield GaugeMetricFamily(
            "starling_samples_per_second", "Swarm throughput in samples per second", value=state["samples_per_second"]
        )
        yield GaugeMetricFamily(
            "starling_tokens_per_second", "Swarm throughput in tokens per second", value=state["tokens_per_second"]
        )
        yield GaugeMetricFamily(
            "starling_samples_this_epoch",
            "Samples accumulated toward the next epoch",
            value=state["samples_this_epoch"],
        )
        yield GaugeMetricFamily("starling_target_batch_size", "Samples per epoch", value=state["target_batch_size"])
        for name, documentation, key in OPTIONAL_GAUGES:
            if state[key] is not None:
                yield GaugeMetricFamily(name, documentation, value=state[key])
        yield CounterMetricFamily(
            "starling_coordinator_polls", "Reads of the swarm's records so far", value=state["polls"]
        )
        if state["checkpoint"] is not None:
            yield GaugeMetricFamily(
                "starling_checkpoint_epoch", "Epoch of the latest checkpoint", value=state["checkpoint"]["epoch"]
            )
            yield GaugeMetricFamily(
                "starling_checkpoint_timestamp_seconds",
                "When the latest checkpoint was written",
                value=state["checkpoint"]["time"],
            )
        evaluation = state["evaluation"]
        if evaluation is not None:
            yield GaugeMetricFamily(
                "starling_eval_loss",
                "Held-out loss of the newest evaluated checkpoint (coordinator --eval-data)",
                value=evaluation["loss"],
            )
            yield GaugeMetricFamily(
                "starling_eval_perplexity", "Held-out perplexity of that checkpoint", value=evaluation["perplexity"]
            )
            yield GaugeMetricFamily("starling_eval_epoch", "Epoch of that checkpoint", value=evaluation["epoch"])
        contributed = CounterMetricFamily(
            "starling_contributor_samples",
            f"Samples contributed, top {TOP_CONTRIBUTORS} contributors and other",
            labels=["name"],
        )
        board = state["leaderboard"]
        for entry in board[:TOP_CONTRIBUTORS]:
            contributed.add_metric([entry["name"]], entry["samples"])
        if len(board) > TOP_CONTRIBUTORS:
            contributed.add_metric(["other"], sum(entry["samples"] for entry in board[TOP_CONTRIBUTORS:]))
        yield contributed


def registry_for(snapshot: Callable[[], dict]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SwarmCollector(snapshot))
    return registry
