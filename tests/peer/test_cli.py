"""starling-peer from the command line: one-line errors with exit status 2, clean exit on SIGTERM."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.harness import LOOPBACK_MADDR, LOOPBACK_VOLUNTEER, PeerProcess, free_port, wait_until
from peer.cli import build_parser
from peer.options import PeerOptions
from tests.commands import run_at_once

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWKwHFESqhcjt2RFErZXU4PfSNEH16HN3vQ4ULa5EbhRrW"


def run_peer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer.cli", *args], capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("starling-peer: error:")]


BAD_INPUTS = [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--batch-size", "zero"], "--batch-size"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/abc"], "'/ip4/127.0.0.1/tcp/abc' is not a valid multiaddr"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/31337"], "lacks the /p2p/<peer id> part"),
    (["--device", "cuda:3"], "--device cuda:3"),
    (["--device", "tpu"], "--device tpu"),
    (["--config", "/nonexistent/run.toml"], "config: '/nonexistent/run.toml' is not a file"),
    (["--client-mode", "--auxiliary"], "client_mode and auxiliary"),
    (["--precision", "fp8"], "--precision"),
]


@pytest.fixture(scope="module")
def bad_input_results() -> list:
    """starling-peer on each of BAD_INPUTS, run at once."""
    return run_at_once([[sys.executable, "-m", "peer.cli", *args] for args, _ in BAD_INPUTS])


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)), ids=[culprit for _, culprit in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_2(bad_input_results, index):
    culprit, result = BAD_INPUTS[index][1], bad_input_results[index]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert culprit in result.stderr


def test_bad_run_config_given_to_a_peer_exits_2_naming_the_key(tmp_path):
    run_toml = tmp_path / "run.toml"
    run_toml.write_text('[training]\nmode = "diloco"\n[diloco]\ncompression = "int3"\n')
    result = run_peer("--config", str(run_toml), "--host-maddrs", LOOPBACK_MADDR)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "diloco.compression must be one of" in result.stderr


def test_unreachable_initial_peers_name_the_address(tmp_path):
    result = run_peer("--initial-peers", UNREACHABLE, "--host-maddrs", LOOPBACK_MADDR)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "none of the initial peers answered" in line and UNREACHABLE in line
    assert "Traceback" not in result.stderr


def test_environment_variables_set_options():
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STARLING_DEVICE": "cuda:7"},
    )
    assert result.returncode == 2 and "--device cuda:7" in result.stderr


def test_the_command_line_takes_every_peer_option_with_its_default(monkeypatch):
    """starling-peer's flags are built from PeerOptions: each option is there, with the API's default
    and type, and its environment variable sets it."""
    for name in os.environ:
        if name.startswith("STARLING_"):
            monkeypatch.delenv(name)
    defaults = PeerOptions()
    parsed = build_parser().parse_args([])
    assert {spec.name: getattr(parsed, spec.name) for spec in fields(PeerOptions)} == asdict(defaults)
    monkeypatch.setenv("STARLING_BATCH_SIZE", "8")
    monkeypatch.setenv("STARLING_CLIENT_MODE", "1")
    monkeypatch.setenv("STARLING_ANNOUNCE_MADDRS", "/ip4/203.0.113.7/tcp/1 /ip4/203.0.113.7/tcp/2")
    parsed = build_parser().parse_args(["--metrics-port", "9100"])
    assert (parsed.batch_size, parsed.client_mode, parsed.metrics_port) == (8, True, 9100)
    assert parsed.announce_maddrs == ["/ip4/203.0.113.7/tcp/1", "/ip4/203.0.113.7/tcp/2"]


def child_pids(pid: int) -> set[int]:
    """All descendants of a process, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_then_sigterm_exits_0_within_10_s_and_leaves_no_process(tmp_path, write_run_config, bootstrap):
    run_toml = write_run_config(tmp_path)
    port = free_port()
    arguments = ["--initial-peers", bootstrap, "--config", str(run_toml), "--metrics-port", str(port)]
    peer = PeerProcess.command_line(tmp_path / "peer", [*arguments, *LOOPBACK_VOLUNTEER])
    process = peer.process
    peer.wait_for_event("epoch", timeout=120)

    def exported_epoch() -> dict[str, float] | None:
        metrics = scrape(port)
        return metrics if metrics.get("starling_peer_epoch", 0) >= 1 else None

    # the exported figures refresh every few seconds
    metrics = wait_until(exported_epoch, 10, "the exported epoch", period=0.5)
    # The counter holds at least what the peer had contributed when its first epoch ended (hivemind
    # may end an epoch before the target batch, when its estimated time is up).
    contributed = peer.wait_for_event("epoch", timeout=0)["samples_contributed"]
    assert metrics["starling_peer_epoch"] >= 1 and metrics["starling_peer_samples_total"] >= contributed > 0
    assert 0 < metrics["starling_peer_loss"] < 12
    children = child_pids(process.pid)
    assert children, "a training peer runs helper processes (DHT, libp2p daemon)"
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert time.monotonic() - sent < 10
    # torch's shared-memory manager leaves once its clients have gone
    wait_until(lambda: not any(alive(pid) for pid in children), 5, "the helper processes to exit", period=0.2)
