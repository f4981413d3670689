"""DiLoCo with overlap ([diloco] overlap = true): a round's pseudo-gradients are averaged and its outer
step taken in the background while the next round's inner steps run, and the model then moves by
what the outer step changed, keeping those inner steps (peer.diloco).

Two peer processes (overlap_worker.py) with real hivemind averagers each train a small network.
Every inner step's change of the parameters is recorded, so at each round's end a peer's parameters
must be the base it started the round from plus the inner steps taken since: the base is the peer's
own round-end parameters until the outer step of that round is applied, and the outer parameters
after it. hivemind's own delayed step copies the outer parameters into the model instead, dropping
the inner steps taken meanwhile, which this would catch."""

import json
import sys
from pathlib import Path

from coordinator.harness import ManagedProcess, bootstrap_node, exit_statuses

WORKER = Path(__file__).with_name("overlap_worker.py")
ROUNDS = 4


def test_with_overlap_the_outer_step_moves_the_model_and_keeps_the_inner_steps_taken_meanwhile(
    tmp_path, write_run_config
):
    run_toml = write_run_config(
        tmp_path,
        optimizer="sgd",
        lr=0.05,
        matchmaking_time=1.0,
        average_state_every=100,
        diloco=dict(
            samples_per_round=48,
            inner_batch_size=4,
            outer_lr=0.7,
            outer_momentum=0.5,
            compression="none",
            overlap=True,
        ),
    )
    with bootstrap_node() as address:
        workers = [
            ManagedProcess(
                [
                    sys.executable,
                    str(WORKER),
                    str(run_toml),
                    address,
                    str(seed),
                    str(ROUNDS),
                    str(tmp_path / f"peer{seed}"),
                ],
                tmp_path / f"peer{seed}.log",
            )
            for seed in (1, 2)
        ]
        codes = exit_statuses(workers, timeout=240)
    assert codes == [0, 0], [worker.log_tail() for worker in workers]
    results = [json.loads((tmp_path / f"peer{seed}.json").read_text()) for seed in (1, 2)]
    for result in results:
        assert result["checks"] >= ROUNDS - result["state_loads"] and result["applied_late"] >= 1, result
        assert max(result["mismatches"]) < 1e-5, result["mismatches"]
        # (a peer may load the other's state once, an epoch behind at the start, and the one that
        # reaches the last epoch first leaves the other's last round alone)
        assert result["outcomes"].count("succeeded") >= 2, result["outcomes"]
