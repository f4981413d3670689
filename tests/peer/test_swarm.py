"""Swarms of real peer processes on loopback: heterogeneous peers, client mode, auxiliaries, late joiners."""

import signal

import pytest
import torch
from swarm_checks import epochs_on_swarm, mode_settings

from coordinator.harness import wait_until
from peer.faults import FaultPlan


@pytest.mark.parametrize("mode", ["batch", "diloco"])
def test_heterogeneous_client_and_auxiliary_peers_all_take_part(
    tmp_path, write_run_config, start_peer, release_peers, mode
):
    run_toml = write_run_config(tmp_path, **mode_settings(mode, 48))
    epochs = 4
    # The trainers train on until all three have entered one same epoch from `epochs` on, each on the
    # swarm's parameters (swarm_checks.epochs_on_swarm): a peer that missed a round (the slow one,
    # when the others fill a round before it reads their progress) catches up by loading the state
    # of those that did not, who must still be there.
    trainer_options = dict(duration=600, snapshots=True, hold=True)
    peers = {
        "fast": start_peer("fast", run_toml, batch_size=8, **trainer_options),
        "slow": start_peer("slow", run_toml, batch_size=2, faults=FaultPlan(slow_forward=0.15), **trainer_options),
        "client": start_peer("client", run_toml, batch_size=4, client_mode=True, **trainer_options),
    }
    helper = start_peer("helper", run_toml, auxiliary=True, hold=True)  # runs until stopped, as helpers do
    release_peers([*peers.values(), helper])

    def shared_epochs_on_swarm() -> list[int]:
        shared = set.intersection(*(epochs_on_swarm(p) for p in peers.values()))
        return sorted(e for e in shared if e >= epochs and all(p.snapshot_path(e).exists() for p in peers.values()))

    common = wait_until(
        shared_epochs_on_swarm,
        300,
        f"the trainers to enter one epoch from {epochs} on on the swarm's parameters",
        alive=list(peers.values()),
    )[0]
    everyone = {**peers, "helper": helper}
    for peer in everyone.values():
        peer.process.send_signal(signal.SIGTERM)
    summaries = {name: peer.wait(timeout=60) for name, peer in everyone.items()}

    trainers = [summaries[name] for name in ("fast", "slow", "client")]
    for name in ("fast", "slow", "client"):
        assert summaries[name]["epoch"] >= epochs, name
    # The helper sees the swarm's epoch only between its blocking averaging rounds: it may stop
    # counting a couple of epochs behind the trainers.
    assert summaries["helper"]["epoch"] >= 1
    for name in ("fast", "slow", "client"):
        summary = summaries[name]
        assert summary["samples_contributed"] > 0, name
        # What a peer counts is what it really processed (nothing was non-finite here).
        assert summary["samples_contributed"] == summary["processed"], name
        assert summary["rounds_succeeded"] >= 1, name
    assert summaries["helper"]["samples_contributed"] == 0 and summaries["helper"]["rounds_succeeded"] >= 1
    # Together they reached the global batch each epoch (what the last epoch got before stop may be partial).
    assert sum(s["samples_contributed"] for s in trainers) >= 48 * epochs
    # On reaching the same epoch they are within about one Adam step (lr 1e-3) of each other, as in
    # the late-joiner test (measured up to 2.6e-3).
    params = [peers[name].snapshot(common) for name in ("fast", "slow", "client")]
    for other in params[1:]:
        for key, value in params[0].items():
            torch.testing.assert_close(other[key], value, atol=5e-3, rtol=0)


@pytest.mark.parametrize("mode", ["batch", "diloco"])
def test_late_joiner_loads_state_and_trains_to_the_same_epoch(
    tmp_path, write_run_config, start_peer, release_peers, mode
):
    """A peer that joins two others at their epoch 2 loads their state (in DiLoCo mode: the outer
    parameters and momentum), trains with them to its last epoch and ends with the parameters they
    had in that epoch (or, where its round into that epoch fell short, agrees with them at the latest
    epoch it entered on the swarm's parameters). The state it loads on joining is exactly the
    parameters one of them had in that state's epoch. (A joiner still catching up when the others
    leave has no one to catch up with: they train on until it is done.)"""
    run_toml = write_run_config(tmp_path, **mode_settings(mode, 64))
    epochs = 8
    early = [start_peer(f"early{i}", run_toml, duration=600, snapshots=True, hold=True) for i in range(2)]
    go = tmp_path / "late-joiner-go"
    # It imports while the others train.
    late = start_peer("late", run_toml, max_epochs=epochs, start_after=go, snapshots=True)
    release_peers(early)
    wait_until(lambda: any(p.logged_epoch() >= 2 for p in early), 120, "the first peers to reach epoch 2")
    go.touch()
    late_summary = late.wait(timeout=300)
    last = late_summary["epoch"]  # a load that ended its catching up may have taken it past max_epochs
    # Their snapshot of its last epoch is written before their next epoch's event; they need not
    # stop for it (the fixture kills them).
    wait_until(
        lambda: all(any(e["epoch"] > last for e in p.events("epoch")) for p in early),
        60,
        "the first peers to pass its last epoch",
    )

    assert late_summary["state_loads"] >= 1 and last >= epochs
    # State travels uncompressed: what it loaded is a donor's parameters, bit for bit.
    joined = next(e["epoch"] for e in late.events("state_loaded"))
    loaded = late.snapshot(joined, loaded=True)
    donors = [peer.snapshot(joined) for peer in early if peer.snapshot_path(joined).exists()]
    assert any(all(torch.equal(loaded[key], value) for key, value in donor.items()) for donor in donors)
    assert late_summary["samples_contributed"] > 0 and late_summary["rounds_succeeded"] >= 1
    # Peers that entered an epoch on the swarm's parameters are within about one Adam step (lr 1e-3)
    # of each other there, from the codec's error on each one's share of the averaged gradient (or
    # pseudo-gradient): the joiner and each of the others, at the latest such epoch of the joiner's
    # (its last, unless the round into it fell short).
    on_swarm = [epochs_on_swarm(peer) for peer in early]
    shared = [epoch for epoch in epochs_on_swarm(late) if epoch > joined and any(epoch in e for e in on_swarm)]
    assert shared, "the joiner entered no epoch on the swarm's parameters after joining"
    epoch = max(shared)
    late_params = late.params() if epoch == last else late.snapshot(epoch)
    snapshots = [peer.snapshot(epoch) for peer, epochs in zip(early, on_swarm) if epoch in epochs]
    for snapshot in snapshots:
        for key, value in snapshot.items():
            torch.testing.assert_close(late_params[key], value, atol=5e-3, rtol=0)
