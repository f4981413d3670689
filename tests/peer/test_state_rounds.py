"""The state averager reports how its rounds ended, as the peer needs to know whether a state
averaging round brought it back together with the swarm (peer.averager.StateRoundsAverager)."""

import contextlib
import copy
import dataclasses
import threading
from collections.abc import Iterator
from functools import partial

import hivemind
import pytest
import torch

from coordinator.harness import LOOPBACK_MADDR, wait_until
from model import CausalLM
from peer.averager import RoundOutcome, StateRound
from peer.optimizer import make_collaborative_optimizer
from peer.run_config import RunConfig
from peer.state_loading import CheckedStateAverager, state_offers

LOOPBACK = [LOOPBACK_MADDR]
MATCHMAKING_TIME, ROUND_TIMEOUT = 2.0, 5.0


@pytest.fixture
def two_averagers():
    first = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=LOOPBACK, start=True)
    averagers = [
        CheckedStateAverager(
            dht=dht,
            optimizer=partial(torch.optim.SGD, lr=0.1),
            params=[torch.nn.Parameter(torch.full((1000,), value))],
            prefix="state_rounds",
            min_matchmaking_time=MATCHMAKING_TIME,
            request_timeout=1.0,
            start=True,
        )
        for dht, value in ((first, 1.0), (second, 3.0))
    ]
    yield averagers
    for averager in averagers:
        if averager.is_alive():
            averager.shutdown()
    first.shutdown()
    second.shutdown()


def average_state(averager, timeout: float = ROUND_TIMEOUT, control=None) -> None:
    """One state round of `averager`: the one pre-scheduled as `control`, or a new one."""
    if control is None:
        averager.step(averaging_round=True, averaging_opts=dict(timeout=timeout))
    else:
        averager.step(averaging_round=True, averaging_control=control)


def settled(averager, timeout: float) -> list[StateRound]:
    """The outcomes of the averager's rounds, once at least one has ended."""
    return wait_until(averager.settle_state_rounds, timeout, "a state averaging round to end")


def average_state_together(averagers, controls=None) -> None:
    """A state round of each averager at once (each the one pre-scheduled in `controls`, if given)."""
    controls = controls or [None] * len(averagers)
    threads = [
        threading.Thread(target=average_state, args=(averager,), kwargs=dict(control=control))
        for averager, control in zip(averagers, controls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_a_state_round_with_the_group_succeeds_and_one_alone_fails(two_averagers):
    average_state_together(two_averagers)
    for averager in two_averagers:
        assert averager.main_parameters[0].tolist() == [2.0] * 1000  # the mean, exact in float32
        assert settled(averager, timeout=ROUND_TIMEOUT) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]

    # The other peer has left: the next round finds no group, and says so once it gives up.
    lone, gone = two_averagers
    gone.shutdown()
    average_state(lone)
    assert settled(lone, timeout=2 * ROUND_TIMEOUT) == [StateRound(RoundOutcome.FAILED, group_size=1)]
    assert lone.main_parameters[0].tolist() == [2.0] * 1000


def test_a_peer_behind_its_groups_epoch_takes_their_state_without_pulling_it_back(two_averagers):
    """State rounds match peers of any epoch: the one behind (epoch 4 against 5) averages with
    weight 0, so both end with the state of the one ahead, not with the mean of the two epochs, and
    the one behind takes that epoch with it (its parameters are of epoch 5 now)."""
    ahead, behind = two_averagers
    ahead.local_epoch, behind.local_epoch = 5, 4
    average_state_together(two_averagers)
    for averager in two_averagers:
        assert averager.main_parameters[0].tolist() == [1.0] * 1000  # ahead's, exactly
        assert settled(averager, timeout=ROUND_TIMEOUT) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
        assert averager.local_epoch == 5
    assert (ahead.group_states_taken, behind.group_states_taken) == (0, 1)


def test_a_peer_that_took_its_groups_epoch_without_their_state_takes_theirs_and_gives_none(two_averagers):
    """A peer whose gradient round found its group an epoch ahead counts their epoch from then on,
    while its parameters stay of the older one. Its next state round gives it the group's state
    and takes none of its own: both end with the state of the one ahead, not with the mean of two
    epochs' parameters (in DiLoCo mode an outer step apart)."""
    ahead, behind = two_averagers
    ahead.local_epoch, behind.local_epoch = 5, 4
    behind.take_epoch_without_state(5)
    average_state_together(two_averagers)
    for averager in two_averagers:
        assert averager.main_parameters[0].tolist() == [1.0] * 1000  # ahead's, exactly
        assert settled(averager, timeout=ROUND_TIMEOUT) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
        assert averager.local_epoch == 5
    assert behind.epochs_without_state == 0  # its parameters are the group's now


@pytest.mark.parametrize("off_swarm", [(True, False), (True, True)], ids=["one-off", "both-off"])
def test_a_peer_off_the_swarms_parameters_takes_its_groups_state_and_gives_none(two_averagers, off_swarm):
    """A peer whose last round was partial or failed is off the swarm's parameters: in a state round
    with a peer of its epoch that is not, it takes theirs and gives none of its own. Two peers both
    off it average, and so come back together."""
    for averager, off in zip(two_averagers, off_swarm):
        averager.local_epoch, averager.off_swarm = 5, off
    average_state_together(two_averagers)
    expected = 2.0 if all(off_swarm) else 3.0  # the mean, or the on-swarm peer's (the second's), exactly
    for averager in two_averagers:
        assert averager.main_parameters[0].tolist() == [expected] * 1000
        assert settled(averager, timeout=ROUND_TIMEOUT) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
        assert averager.local_epoch == 5


def test_a_pre_scheduled_state_round_gathers_the_epoch_the_peer_will_hold_not_the_runs(two_averagers):
    """hivemind's optimizer pre-schedules the state round of a peer's next epoch step with the later
    of that epoch and the run's. A peer two epochs behind the run (3 against 5, the run at 6 once the
    one ahead steps) must not claim 6: it takes the state of the one ahead and gives none of its own."""
    ahead, behind = two_averagers
    ahead.local_epoch, behind.local_epoch = 5, 3
    controls = [averager.schedule_step(gather=6, timeout=ROUND_TIMEOUT) for averager in two_averagers]
    average_state_together(two_averagers, controls)
    for averager in two_averagers:
        assert settled(averager, timeout=ROUND_TIMEOUT) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
        assert averager.main_parameters[0].tolist() == [1.0] * 1000  # ahead's, exactly
    assert (ahead.group_states_taken, behind.group_states_taken) == (0, 1)


def test_the_state_a_donor_hands_over_does_not_change_with_its_next_step(two_averagers):
    """The averager's process streams a donor's state to a loading peer for as long as the download
    takes, while the donor trains on: what it hands over is a copy, not the live parameters and
    statistics (a joiner whose download overlapped the donor's step got some tensors of each epoch)."""
    donor = two_averagers[0]
    _, tensors, _ = donor.get_current_state()
    with torch.no_grad():  # the donor's next optimizer step, in place
        for group in donor.optimizer.param_groups:
            for param in group["params"]:
                param.add_(1.0)
    assert tensors[0].tolist() == [1.0] * 1000


@contextlib.contextmanager
def two_peers(run: RunConfig) -> Iterator[tuple[list[CausalLM], list]]:
    """The collaborative optimizers of two peers of `run` (on two DHTs of one swarm) over copies of
    one model: (models, optimizers), shut down afterwards."""
    first = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=LOOPBACK, start=True)
    torch.manual_seed(0)
    models = [CausalLM(run.model_config())]
    models.append(copy.deepcopy(models[0]))
    optimizers = [
        make_collaborative_optimizer(model, dht, run, batch_size_per_step=4)
        for model, dht in zip(models, (first, second))
    ]
    try:
        yield models, optimizers
    finally:
        for opt in optimizers:
            opt.shutdown()
        first.shutdown()
        second.shutdown()


# The statistics of each mode's shared optimizer (shipped settings): AdamW's moments in batch mode,
# the outer Nesterov momentum in DiLoCo mode; each filled with value x (peer index + 1)^power.
STATISTICS = {
    "batch": {"exp_avg": (0.01, 1), "exp_avg_sq": (1e-4, 2)},
    "diloco": {"momentum_buffer": (0.01, 1)},
}


@pytest.mark.parametrize("mode", STATISTICS)
def test_a_state_round_brings_the_peers_optimizer_statistics_together(mode):
    """Two peers of a run with the shipped settings (offloaded optimizer), the second a joiner that
    loaded the first's state, whose optimizer statistics then differ (as after a partial round): a
    state averaging round averages them with the parameters, so that the same averaged gradients
    (or pseudo-gradients) move both alike from then on. Averaging the parameters alone, or the
    statistics the joiner held before it loaded state, left peers stepping apart after every state
    round (tests/peer/test_agreement.py)."""
    run = RunConfig.from_dict({"run_id": "moments", "model": {"preset": "tiny"}, "training": {"mode": mode}})
    with two_peers(run) as (_, optimizers):
        veteran, joiner = (opt.state_averager for opt in optimizers)
        prefix = veteran.prefix
        joining = optimizers[1].dht
        wait_until(lambda: veteran.peer_id in state_offers(joining, prefix), 30, "the first peer's state offer")
        joiner.load_state_from_peers()
        assert joiner.states_received == 1
        for index, averager in enumerate((veteran, joiner)):
            for state in averager.optimizer.state.values():
                for key, (value, power) in STATISTICS[mode].items():
                    state[key].fill_(value * (index + 1) ** power)

        timeout = run.averaging.averaging_timeout
        rounds = [threading.Thread(target=average_state, args=(averager, timeout)) for averager in (veteran, joiner)]
        for thread in rounds:
            thread.start()
        for thread in rounds:
            thread.join()
        for averager in (veteran, joiner):
            assert settled(averager, timeout) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
            for state in averager.optimizer.state.values():
                for key, (value, power) in STATISTICS[mode].items():
                    mean = value * (1 + 2**power) / 2
                    torch.testing.assert_close(state[key], torch.full_like(state[key], mean))


@pytest.mark.parametrize("mode", ["batch", "diloco"])
def test_every_averager_of_a_peer_starts_under_the_matchmaking_key_its_id_picks(mode):
    """A run of Moshpit averaging (averaging.group_key_bits = 3): the gradient (or pseudo-gradient)
    averager and the state averager of each peer look for groups under the key its id picks, one of
    eight, as the round test of test_hivemind_fixes.py expects of every peer."""
    run = RunConfig.from_dict(
        {"run_id": "keys", "model": {"preset": "tiny"}, "training": {"mode": mode}, "averaging": {"group_key_bits": 3}}
    )
    with two_peers(run) as (_, optimizers):
        for opt in optimizers:
            expected = run.averaging.initial_group_bits(opt.dht.peer_id.to_bytes())
            assert len(expected) == 3
            assert opt.grad_averager.get_group_bits() == opt.state_averager.get_group_bits() == expected


@pytest.fixture
def diloco_pair():
    """Two peers of a DiLoCo-mode run (tiny model, shipped settings) as (run, models, optimizers),
    the second's round started from outer parameters 0.01 above the first's."""
    run = RunConfig.from_dict({"run_id": "diloco-pair", "model": {"preset": "tiny"}, "training": {"mode": "diloco"}})
    with two_peers(run) as (models, optimizers):
        with torch.no_grad():
            for outer, param in zip(optimizers[1].state_averager.outer_parameters(), models[1].parameters()):
                outer.add_(0.01)
                param.add_(0.01)
        yield run, models, optimizers


def start_state_rounds(averagers, timeout: float) -> list[torch.Tensor]:
    """Start a state round of both in the background, as hivemind's epoch step does; returns the
    mean of their outer parameters, what the round leads both to."""
    mean = [(a + b) / 2 for a, b in zip(*(averager.outer_parameters() for averager in averagers))]
    for averager in averagers:
        averager.step(averaging_round=True, delay_averaging=True, averaging_opts=dict(timeout=timeout))
    return mean


def test_a_diloco_state_round_ending_mid_round_keeps_the_inner_steps_taken_meanwhile(diloco_pair):
    """DiLoCo mode: a state round averages the outer parameters in the background while the peers
    take their next round's inner steps. When it ends, each model moves by what the round changed
    in its outer parameters and keeps those inner steps (copying the outer parameters into the
    model, as hivemind does with an offloaded optimizer, erased them)."""
    run, models, optimizers = diloco_pair
    averagers = [opt.state_averager for opt in optimizers]
    timeout = run.averaging.averaging_timeout
    mean = start_state_rounds(averagers, timeout)
    inner_steps = [[torch.randn_like(p) * 1e-3 for p in model.parameters()] for model in models]
    with torch.no_grad():
        for model, steps in zip(models, inner_steps):
            torch._foreach_add_(list(model.parameters()), steps)
    wait_until(lambda: all(a.finished_averaging_round.is_set() for a in averagers), timeout, "the state round")
    for averager, model, steps in zip(averagers, models, inner_steps):
        averager.step(apply_delayed_updates=True)  # as hivemind's next Optimizer.step begins
        assert settled(averager, timeout) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
        for param, outer, step in zip(model.parameters(), mean, steps):
            torch.testing.assert_close(param.detach(), outer + step, atol=1e-6, rtol=0)


def test_a_diloco_outer_step_waits_for_the_state_round_under_way_and_steps_from_its_average(diloco_pair):
    """DiLoCo mode: a peer's next outer step comes while its state round still averages. The step
    waits for the round and steps from the average (first step of Nesterov SGD from a zero
    momentum: lr * (1 + momentum) * gradient). Taken before, the round's older state was copied over
    it when applied: the step was lost, and the peer a whole outer step off the others."""
    run, models, optimizers = diloco_pair
    averagers = [opt.state_averager for opt in optimizers]
    timeout = run.averaging.averaging_timeout
    mean = start_state_rounds(averagers, timeout)
    stepping = averagers[0]
    gradients = [torch.randn_like(p) * 1e-3 for p in stepping.outer_parameters()]
    for param, gradient in zip(stepping.outer_parameters(), gradients):
        param.grad = gradient.clone()
    group = stepping.optimizer.param_groups[0]
    scale = group["lr"] * (1 + group["momentum"])
    stepping.step(increment_epoch=True, optimizer_step=True)  # as hivemind's epoch step takes it
    wait_until(lambda: averagers[1].finished_averaging_round.is_set(), timeout, "the other's state round")
    for averager in averagers:
        averager.step(wait_for_delayed_updates=True)  # whatever is left to apply
        assert settled(averager, timeout) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
    for param, outer, gradient in zip(stepping.outer_parameters(), mean, gradients):
        torch.testing.assert_close(param.detach(), outer - scale * gradient, atol=1e-6, rtol=0)
    for param, outer in zip(models[0].parameters(), stepping.outer_parameters()):
        torch.testing.assert_close(param.detach(), outer, atol=0, rtol=0)


def test_a_diloco_peer_whose_state_round_gives_it_the_epoch_it_steps_into_does_not_step_again(diloco_pair):
    """DiLoCo mode: a peer's state round, started for epoch 5, matches the other's round of epoch 6
    (hivemind's keys carry no epoch), whose state holds the outer step of round 6 both averaged the
    pseudo-gradients of. The round ends as the peer's own step into epoch 6 begins: it takes the
    other's state and epoch and does not step again. Stepping again left it a whole outer step
    (0.014) from the other at the end of a test run."""
    run, models, optimizers = diloco_pair
    averagers = [opt.state_averager for opt in optimizers]
    behind, ahead = averagers
    behind.local_epoch, ahead.local_epoch = 5, 6
    timeout = run.averaging.averaging_timeout
    start_state_rounds(averagers, timeout)
    theirs = [param.detach().clone() for param in ahead.outer_parameters()]
    for param in behind.outer_parameters():
        param.grad = torch.randn_like(param) * 1e-3  # round 6's averaged pseudo-gradient, already in theirs
    behind.step(increment_epoch=True, optimizer_step=True)  # as hivemind's epoch step takes it
    ahead.step(wait_for_delayed_updates=True)
    for averager in averagers:
        assert settled(averager, timeout) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
        assert averager.local_epoch == 6
    for param, their in zip(behind.outer_parameters(), theirs):
        torch.testing.assert_close(param.detach(), their, atol=0, rtol=0)
    for param, outer in zip(models[0].parameters(), behind.outer_parameters()):
        torch.testing.assert_close(param.detach(), outer, atol=0, rtol=0)


def test_peers_an_epoch_apart_take_the_state_round_of_the_same_epochs():
    """A joiner whose state was an epoch old averages its first gradient round with a peer an epoch
    ahead (matchmaking keys carry no epoch). hivemind decides whether an epoch ends with a state
    round from the peer's own epoch, so with a state round every second epoch exactly one of the two
    ran one, alone, and searched for a group until the averaging timeout, holding that peer's next
    optimizer step as long. The peer behind takes the group's epoch first, and both take the round."""
    run = RunConfig.from_dict(
        {"run_id": "epoch-apart", "model": {"preset": "tiny"}, "averaging": {"average_state_every": 2}}
    )
    with two_peers(run) as (models, optimizers):
        tokens = torch.randint(0, run.model_config().vocab_size, (4, 16))
        for opt, model, epoch in zip(optimizers, models, (3, 2)):  # the first's next epoch ends with a state round
            opt.state_averager.local_epoch = epoch
            model(tokens, labels=tokens).loss.backward()
            opt.grad_averager.accumulate_grads_(4)
            # The run as each counts it once both have reported: two peers, at the first's epoch.
            # (Trackers of one process report under one DHT subkey and would not count each other.)
            opt.tracker.shutdown()
            with opt.tracker.pause_updates():
                opt.tracker.update_epoch(new_epoch=epoch)
                opt.tracker.global_progress = dataclasses.replace(
                    opt.tracker.global_progress, epoch=3, num_peers=2, samples_accumulated=8
                )
        # hivemind's epoch step, as Optimizer.step takes it once the swarm has the target batch
        epoch_steps = [threading.Thread(target=opt._update_global_epoch, args=(None,)) for opt in optimizers]
        for thread in epoch_steps:
            thread.start()
        for thread in epoch_steps:
            thread.join()
        timeout = run.averaging.averaging_timeout
        for opt in optimizers:
            assert settled(opt.state_averager, timeout) == [StateRound(RoundOutcome.SUCCEEDED, group_size=2)]
        assert [opt.local_epoch for opt in optimizers] == [4, 4]


def test_a_lone_peer_whose_epoch_step_finds_the_run_far_ahead_loads_its_state():
    """A peer cut off from the others takes its epochs alone, and its epoch step reads the run's
    progress afresh (it counts no other peer). When that read is the first to see the others again,
    epochs ahead, the peer loads their state. hivemind's epoch step took their epoch number with the
    peer's own parameters instead: a cut-off peer came back 8 epochs on, its parameters its own."""
    run = RunConfig.from_dict({"run_id": "far-ahead", "model": {"preset": "tiny"}})
    with two_peers(run) as (models, optimizers):
        lone, ahead = optimizers
        # The lone peer's view of the run, from a read before the other's record: itself alone, at
        # its epoch 2. Its tracker's next background read is then an hour away.
        lone.tracker.min_refresh_period = lone.tracker.max_refresh_period = 3600.0
        lone.state_averager.local_epoch = 2
        with lone.tracker.pause_updates():
            lone.tracker.update_epoch(new_epoch=2)
        wait_until(lone.tracker.fetched_global_progress_this_epoch.is_set, 30, "the lone peer's read")
        assert (lone.tracker.global_progress.num_peers, lone.tracker.global_epoch) == (1, 2)

        ahead.state_averager.local_epoch = ahead.state_averager.state_sharing_priority = 10
        with torch.no_grad():
            for group in ahead.state_averager.optimizer.param_groups:
                for param in group["params"]:
                    param.add_(0.01)
        theirs = [param.detach().clone() for group in ahead.opt.param_groups for param in group["params"]]
        ahead.tracker.report_local_progress(local_epoch=10, samples_accumulated=4)
        prefix = ahead.state_averager.prefix
        wait_until(lambda: ahead.state_averager.peer_id in state_offers(lone.dht, prefix), 30, "the state offer")

        def the_record_of_epoch_10() -> bool:
            found = lone.dht.get(lone.tracker.training_progress_key, latest=True)
            entries = found.value.values() if found is not None and isinstance(found.value, dict) else ()
            return any(isinstance(entry.value, dict) and entry.value.get("epoch") == 10 for entry in entries)

        wait_until(the_record_of_epoch_10, 30, "the other peer's progress record")
        assert lone.tracker.global_progress.num_peers == 1  # its view is still that of its last read

        lone._update_global_epoch(None)  # as hivemind's step takes it once the lone peer has its batch

        assert lone.state_averager.states_received == 1
        assert lone.local_epoch == 10
        for param, their in zip(models[0].parameters(), theirs):
            torch.testing.assert_close(param.detach(), their, atol=0, rtol=0)
