"""A real coordinator with real peer processes on loopback: what it shows, what it saves, how it recovers."""

import json
import math
import signal
import time

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import model  # noqa: F401  (registers the "starling" architecture with transformers' Auto classes)
from coordinator.eval_cli import main as starling_eval
from coordinator.harness import wait_until


def contributions(state: dict) -> dict[str, int]:
    return {peer["name"]: peer["samples"] for peer in state["peers"]}


def test_state_metrics_and_a_checkpoint_equal_to_the_peers(
    tmp_path, write_run_config, coordinator, launch_peer, release_peers, write_prepared_text, capsys
):
    run_toml = write_run_config(tmp_path, target_batch_size=32, checkpoint_every=2)
    held_out = tmp_path / "held-out"
    write_prepared_text(held_out, 12, seq_len=48)
    coord = coordinator(run_toml, "--eval-data", str(held_out), "--eval-sequences", "10")
    peers = [
        launch_peer(name, initial_peers=[coord.address], max_epochs=6, snapshots=True, hold=True)
        for name in ("alice", "bob")
    ]
    release_peers(peers)

    first = coord.wait_for(
        lambda s: all(contributions(s).get(n, 0) > 0 for n in ("alice", "bob")), 180, "both peers to contribute"
    )
    # Each peer reports its samples at the end of its own epochs, which may lag the swarm's by one.
    later = coord.wait_for(
        lambda s: (
            s["epoch"] >= first["epoch"] + 2
            and all(contributions(s)[n] > contributions(first)[n] for n in ("alice", "bob"))
        ),
        180,
        "two more epochs with more samples from both peers",
    )
    assert later["active_peers"]["cpu"] == 2 and later["active_peers"]["total"] == 2
    assert later["samples_per_second"] > 0 and math.isfinite(later["loss"])
    assert {p["status"] for p in later["peers"]} == {"online"}
    # Both have averaged (bytes sent) and computed part of the time since they began.
    assert all(p["bytes_per_sample"] > 0 and 0 < p["compute_share"] < 1 for p in later["peers"]), later["peers"]

    for _ in range(10):  # the coordinator polls the swarm every second: read both between two polls
        metrics, state = coord.metrics(), coord.state()
        if metrics["starling_samples"][0].value == state["samples_total"]:
            break
    assert metrics["starling_samples"][0].value == state["samples_total"] > 0
    assert metrics["starling_epoch"][0].value == state["epoch"]
    active = {sample.labels["kind"]: sample.value for sample in metrics["starling_active_peers"]}
    assert active == {kind: state["active_peers"][kind] for kind in ("gpu", "cpu", "client", "auxiliary")}
    assert {s.labels["name"] for s in metrics["starling_contributor_samples"]} == {"alice", "bob"}

    for peer in peers:
        peer.wait(timeout=300)
    checkpoint = coord.wait_for(lambda s: s["checkpoint"] is not None, 60, "a checkpoint")["checkpoint"]
    assert coord.metrics()["starling_checkpoint_epoch"][0].value == checkpoint["epoch"]
    loaded = dict(AutoModelForCausalLM.from_pretrained(checkpoint["path"]).named_parameters())
    snapshots = [load_file(tmp_path / name / f"epoch-{checkpoint['epoch']}.safetensors") for name in ("alice", "bob")]
    # The checkpoint is a state its donor held in that epoch: its parameters on reaching it or, once
    # the epoch's state averaging round (every epoch here) is applied, the two peers' mean. The other
    # peer may differ by about one Adam step (lr = 1e-3), from the codec's error on its gradient share.
    held = [*snapshots, {key: (snapshots[0][key] + snapshots[1][key]) / 2 for key in snapshots[0]}]
    distances = [max((loaded[key].detach() - value).abs().max().item() for key, value in s.items()) for s in held]
    assert min(distances) < 1e-6 and max(distances) < 5e-3, distances

    # The coordinator evaluates each checkpoint on its held-out set as starling-eval does.
    evaluation = coord.wait_for(
        lambda s: s["evaluation"] is not None and s["evaluation"]["epoch"] == checkpoint["epoch"],
        120,
        "the checkpoint's evaluation",
    )["evaluation"]
    assert starling_eval(["--checkpoint", checkpoint["path"], "--data", str(held_out), "--sequences", "10"]) == 0
    command = json.loads(capsys.readouterr().out)
    assert evaluation["sequences"] == command["sequences"] == 10 and evaluation["tokens"] == command["tokens"]
    assert evaluation["loss"] == pytest.approx(command["loss"], rel=1e-6)
    assert coord.metrics()["starling_eval_loss"][0].value == evaluation["loss"]

    points = coord.history()
    assert points and points[-1]["epoch"] >= later["epoch"]
    assert b"dashboard.js" in coord.get("/")


def test_peers_outlive_the_coordinator_and_a_restarted_swarm_resumes_from_the_checkpoint(
    tmp_path, write_run_config, coordinator, launch_peer
):
    run_toml = write_run_config(tmp_path, target_batch_size=32, checkpoint_every=2)
    coord = coordinator(run_toml)
    address, coordinator_id = coord.address, coord.state()["coordinator"]["peer_id"]
    peers = [launch_peer(name, initial_peers=[address]) for name in ("alice", "bob")]
    before = coord.wait_for(
        lambda s: s["checkpoint"] is not None and all(contributions(s).get(n, 0) > 0 for n in ("alice", "bob")),
        240,
        "a checkpoint and both peers contributing",
    )

    coord.kill()  # SIGKILL, helpers included
    killed_at = time.time()
    epoch_at_kill = max(peer.logged_epoch() for peer in peers)
    wait_until(
        lambda: max(peer.logged_epoch() for peer in peers) >= epoch_at_kill + 2,
        90,
        "two more epochs without the coordinator",
        period=1,
    )

    coord.start()
    after = coord.wait_for(
        lambda s: s["epoch"] > epoch_at_kill and len(contributions(s)) == 2,
        60,
        "the restarted coordinator to see the swarm",
    )
    assert after["coordinator"]["peer_id"] == coordinator_id and after["initial_peers"][0] == address
    board = {entry["name"]: entry["samples"] for entry in after["leaderboard"]}
    assert all(board[name] >= samples for name, samples in contributions(before).items())
    assert any(point["time"] < killed_at for point in coord.history()), "the history before the crash was lost"

    for peer in peers:
        peer.process.send_signal(signal.SIGTERM)
        peer.wait(timeout=60)
    assert coord.stop() == 0
    coord.start()  # the whole swarm restarts: nobody has state but the coordinator's checkpoint
    resumed_from = coord.state()["checkpoint"]["epoch"]
    carol = launch_peer("carol", initial_peers=[address], max_epochs=resumed_from + 1)
    summary = carol.wait(timeout=240)
    assert [e["epoch"] for e in carol.events("state_loaded")] == [resumed_from]
    assert summary["epoch"] == resumed_from + 1 and summary["samples_contributed"] > 0
