"""How the coordinator sums up the swarm from the peers' records."""

from hivemind.optim.progress_tracker import LocalTrainingProgress

from coordinator.history import Contributor
from coordinator.swarm import LISTED_FOR, ONLINE_WITHIN, summarize
from peer.metrics import PeerMetrics

NOW = 10_000.0


def report(name: str, loss: float, speed: float, age: float = 1.0, **fields) -> PeerMetrics:
    values = dict(
        peer_id=f"id-{name}",
        name=name,
        epoch=7,
        loss=loss,
        samples_per_second=speed,
        tokens_per_second=speed * 32,
        samples_contributed=100,
        device="cpu",
        device_name="cpu",
        micro_batch=4,
        client_mode=False,
        auxiliary=False,
        version="0",
        addresses=[],
        time=NOW - age,
    )
    return PeerMetrics(**{**values, **fields})


def progress(epoch: int, accumulated: int, speed: float) -> LocalTrainingProgress:
    return LocalTrainingProgress(
        peer_id=b"x",
        epoch=epoch,
        samples_accumulated=accumulated,
        samples_per_second=speed,
        time=NOW,
        client_mode=False,
    )


def contributor(name: str, age: float) -> Contributor:
    return Contributor(f"id-{name}", name, "cpu", "cpu", NOW - 100, NOW - age, 100, 99.0)


def test_epoch_eta_loss_and_kinds():
    reports = [
        report("a", 6.0, 3.0),
        report("b", 8.0, 1.0),
        report("gpu", 7.0, 4.0, device="cuda"),
        report("nat", 7.0, 0.0, client_mode=True),
        report("aux", float("nan"), 0.0, auxiliary=True),
        report("old", 1.0, 9.0, age=ONLINE_WITHIN + 5),
    ]
    state = summarize(
        [progress(7, 20, 3.0), progress(7, 12, 1.0), progress(6, 99, 4.0)],
        reports,
        [contributor("a", 1), contributor("old", ONLINE_WITHIN + 5), contributor("gone", LISTED_FOR + 1)],
        target_batch_size=64,
        seq_len=32,
        known_epoch=5,
        now=NOW,
    )
    assert state.epoch == 7 and state.samples_this_epoch == 32
    assert state.samples_per_second == 8.0 and state.tokens_per_second == 256.0
    assert state.eta_seconds == (64 - 32) / 8.0
    # Weighted by speed; the stale peer and the auxiliary one do not count. The client has speed 0: weight ~0.
    assert abs(state.loss - (6.0 * 3 + 8.0 * 1 + 7.0 * 4) / 8) < 1e-6
    assert state.active_peers == {"total": 5, "gpu": 1, "cpu": 2, "client": 1, "auxiliary": 1}
    assert {p["name"]: p["status"] for p in state.peers} == {"a": "online", "old": "stale"}


def test_nothing_known_yet():
    state = summarize([], [], [], target_batch_size=64, seq_len=32, known_epoch=3, now=NOW)
    assert state.epoch == 3 and state.loss is None and state.eta_seconds is None and state.peers == []


def test_round_outcomes_of_the_online_peers_are_summed_and_listed_per_peer():
    reports = [
        report("a", 6.0, 3.0, rounds_succeeded=10, rounds_partial=1, rounds_failed=2),
        report("b", 6.0, 3.0, rounds_succeeded=7),
        report("old", 6.0, 3.0, age=ONLINE_WITHIN + 5, rounds_succeeded=50, rounds_partial=5),
    ]
    state = summarize(
        [],
        reports,
        [contributor("a", 1), contributor("old", ONLINE_WITHIN + 5)],
        target_batch_size=64,
        seq_len=32,
        known_epoch=0,
        now=NOW,
    )
    assert state.rounds == {"succeeded": 17, "partial": 1, "failed": 2}
    rows = {p["name"]: p["rounds"] for p in state.peers}
    assert rows == {
        "a": {"succeeded": 10, "partial": 1, "failed": 2},
        "old": {"succeeded": 50, "partial": 5, "failed": 0},
    }


def test_each_peer_is_listed_with_what_it_distills_from():
    reports = [
        report("big", 6.0, 1.0, objective="distill", teacher="teacher"),
        report("small", 6.0, 1.0, objective="distill", teacher="top-16"),
        report("plain", 6.0, 1.0),
    ]
    contributors = [contributor(name, 1) for name in ("big", "small", "plain")]
    state = summarize([], reports, contributors, target_batch_size=64, seq_len=32, known_epoch=5, now=NOW)
    assert {p["name"]: p["objective"] for p in state.peers} == {
        "big": "distill (teacher)",
        "small": "distill (top-16)",
        "plain": "pretrain",
    }
