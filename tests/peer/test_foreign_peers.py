"""Peers that do not belong to the run: another configuration under the same run id, or a tampered
client whose model has another shape. Neither averages with the run's peers, the members refuse the
tampered peer's state though it is epochs ahead, and the run goes on."""

import signal

import torch

from coordinator.harness import wait_until
from peer.faults import FaultPlan


def test_peers_of_another_configuration_or_shape_average_with_nobody_of_the_run(
    tmp_path, write_run_config, start_peer, release_peers
):
    run_id, epochs = "foreign-peers", 4
    run_toml = write_run_config(tmp_path, run_id=run_id, target_batch_size=48)
    (tmp_path / "other").mkdir()
    other_toml = write_run_config(tmp_path / "other", run_id=run_id, target_batch_size=48, lr=5e-3)
    intruders = {
        "other-config": start_peer("other-config", other_toml),
        # The run's configuration, a model of another shape: hivemind's matchmaking refuses its schema.
        "tampered": start_peer("tampered", run_toml, faults=FaultPlan(model_overrides={"intermediate_size": 192})),
    }
    # The tampered peer runs epochs ahead alone, so it is the first donor the members ask for state.
    tampered = intruders["tampered"]
    wait_until(lambda: tampered.logged_epoch() >= 2, 180, "the tampered peer's epochs alone", alive=[tampered])
    members = [start_peer(f"member{i}", run_toml, max_epochs=epochs, hold=True) for i in range(2)]
    release_peers(members)
    summaries = [member.wait(timeout=300) for member in members]
    for intruder in intruders.values():
        intruder.process.send_signal(signal.SIGTERM)
    intruder_summaries = {name: intruder.wait(timeout=60) for name, intruder in intruders.items()}

    tampered_id = intruders["tampered"].wait_for_event("joined", timeout=0)["peer_id"]
    for member, summary in zip(members, summaries):
        assert summary["epoch"] >= epochs and summary["rounds_succeeded"] >= 1
        refused = {e["donor"] for e in member.events("state_refused")}
        assert tampered_id in refused, member.events()
    for name, summary in intruder_summaries.items():
        assert summary["rounds_succeeded"] == 0, f"{name} averaged with someone"
    # The members' model is intact: finite, and together within about one Adam step (lr 1e-3).
    params = [member.params() for member in members]
    for key, value in params[0].items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(params[1][key], value, atol=5e-3, rtol=0)
