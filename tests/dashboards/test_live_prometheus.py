"""A real Prometheus scrapes a live coordinator and two peers; every dashboard query then returns data."""

import contextlib
import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from coordinator.harness import HarnessError, free_port, wait_until

ALERTS = Path(__file__).parents[2] / "dashboards" / "prometheus" / "alerts.yml"


class PrometheusServer:
    """A `prometheus` process on loopback scraping the given targets every second, with the shipped alerts."""

    def __init__(self, binary: str, folder: Path, targets: dict[str, list[str]]) -> None:
        self.folder = folder
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()
            ],
        }
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        assert self.process.poll() is None, (self.folder / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str):
        """The "data" of a GET /api/v1/{path}."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            return json.loads(response.read())["data"]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


@pytest.fixture
def prometheus_server(prometheus, tmp_path):
    """prometheus_server(targets by job) -> a ready PrometheusServer; killed at the end of the test."""
    started = []

    def start(targets: dict[str, list[str]]) -> PrometheusServer:
        folder = tmp_path / "prometheus"
        folder.mkdir()
        started.append(PrometheusServer(prometheus, folder, targets))
        wait_until(started[-1].ready, 30, "Prometheus to be ready", period=1)
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_every_dashboard_query_returns_samples_from_a_live_swarm(
    tmp_path, write_run_config, coordinator, launch_peer, prometheus_server, queries, write_prepared_text
):
    write_prepared_text(tmp_path / "held-out", 8)  # each checkpoint's held-out loss has its panel
    run_toml = write_run_config(tmp_path, target_batch_size=32, checkpoint_every=2)
    coord = coordinator(run_toml, "--eval-data", str(tmp_path / "held-out"))
    peer_hosts = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    for name, host in zip(("alice", "bob"), peer_hosts):
        launch_peer(name, initial_peers=[coord.address], metrics_port=int(host.split(":")[1]), duration=600)
    coordinator_host = f"127.0.0.1:{coord.dashboard_port}"
    server = prometheus_server({"starling-coordinator": [coordinator_host], "starling-peers": peer_hosts})

    coord.wait_for(
        lambda s: s["epoch"] >= 2 and s["evaluation"] is not None and len(s["peers"]) == 2,
        300,
        "two epochs and an evaluated checkpoint",
    )

    def targets_up() -> dict[str, str] | None:
        health = {t["labels"]["instance"]: t["health"] for t in server.api("targets")["activeTargets"]}
        return health if set(health.values()) == {"up"} else None

    health = wait_until(targets_up, 30, "every target up", period=1)
    assert health == {host: "up" for host in [coordinator_host, *peer_hosts]}

    def without_samples() -> list[str]:
        return [expr for expr in queries if not server.api("query", query=expr)["result"]]

    with contextlib.suppress(HarnessError):  # and then name the queries still without samples
        wait_until(lambda: not without_samples(), 60, "samples for every query", period=1)
    assert not (empty := without_samples()), f"no samples for {empty}"

    def rules_ok() -> dict[str, str] | None:
        rules = {rule["name"]: rule["health"] for group in server.api("rules")["groups"] for rule in group["rules"]}
        return rules if set(rules.values()) == {"ok"} else None

    rules = wait_until(rules_ok, 30, "every alerting rule evaluated", period=1)
    assert rules == {
        name: "ok"
        for name in (
            "StarlingCoordinatorDown",
            "StarlingNoActivePeers",
            "StarlingEpochStalled",
            "StarlingAveragingFailing",
            "StarlingAveragingPartial",
        )
    }
