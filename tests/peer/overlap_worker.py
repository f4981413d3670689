"""A peer of tests/peer/test_diloco_overlap.py: a small network trained by a DiLoCo optimizer with
overlap, checking at every round's end that its parameters are the round's base plus the inner
steps taken since.

    overlap_worker.py RUN_TOML INITIAL_PEER SEED ROUNDS OUT

Writes OUT.json: the checks, the rounds' outcomes and the state loads.
"""

import json
import sys
from pathlib import Path

import hivemind
import torch

from coordinator.harness import LOOPBACK_MADDR, wait_until
from peer.averager import RoundOutcome
from peer.diloco import make_diloco_optimizer
from peer.run_config import RunConfig

MICRO_BATCH = 4


class OverlapPeer:
    """A small network trained by a DiLoCo optimizer with overlap, checking the invariant above."""

    def __init__(self, dht: hivemind.DHT, run: RunConfig, seed: int) -> None:
        torch.manual_seed(0)  # the same initial parameters on both peers
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.optimizer = make_diloco_optimizer(self.model, dht, run, batch_size_per_step=MICRO_BATCH)
        self.data = torch.Generator().manual_seed(seed)
        self.since_round_end = [torch.zeros_like(p) for p in self.model.parameters()]  # inner steps' changes
        self.mismatches: list[float] = []  # at each check, the largest deviation from the invariant
        self.checks = self.applied_late = 0
        self.outcomes: list[RoundOutcome] = []
        self.state_loads = 0
        self._before: list[torch.Tensor] = []
        self.optimizer.inner_optimizer.register_step_pre_hook(self._remember)
        self.optimizer.inner_optimizer.register_step_post_hook(self._add_inner_step)
        self.optimizer.before_outer_step = self._check_and_start_round

    def _remember(self, *_) -> None:
        self._before = [p.detach().clone() for p in self.model.parameters()]

    def _add_inner_step(self, *_) -> None:
        # (the hooks run twice a step, for the clipping optimizer class and its base: count it once)
        for total, param, before in zip(self.since_round_end, self.model.parameters(), self._before):
            total += param.detach() - before
            before.copy_(param.detach())

    @torch.no_grad()
    def check(self) -> None:
        """The parameters are the round's base plus the inner steps since its start."""
        pending = self.optimizer.grad_averager.round_end
        base = pending if pending is not None else self.optimizer.state_averager.outer_parameters()
        self.applied_late += pending is None and self.checks > 0
        deviation = max(
            float((param - (start + steps)).abs().max())
            for param, start, steps in zip(self.model.parameters(), base, self.since_round_end)
        )
        self.mismatches.append(deviation)
        self.checks += 1

    def _check_and_start_round(self) -> None:
        self.check()
        for total in self.since_round_end:
            total.zero_()

    def micro_batch(self) -> None:
        """One micro-batch of regression, a step of the collaborative optimizer (an inner step)."""
        inputs = torch.randn(MICRO_BATCH, 16, generator=self.data)
        loss = (self.model(inputs).squeeze(-1) - inputs.sum(-1).sin()).pow(2).mean()
        loss.backward()
        loads = self.optimizer.state_averager.states_received
        self.optimizer.step(batch_size=MICRO_BATCH)
        self.optimizer.zero_grad()
        if self.optimizer.state_averager.states_received != loads:
            # hivemind loaded the swarm's state instead of stepping (a peer an epoch behind): the
            # model now holds the loaded outer parameters, and the round starts from them
            for total in self.since_round_end:
                total.zero_()
            self.state_loads += 1

    def train(self, rounds: int) -> None:
        # Start once both peers are in the run's progress records, so that they average every round.
        # (hivemind publishes a peer's progress once it has samples: a first micro-batch, far from a round)
        self.micro_batch()
        wait_until(lambda: self.optimizer.tracker.global_progress.num_peers >= 2, 120, "the other peer")
        while self.optimizer.local_epoch < rounds:
            self.micro_batch()
        for _ in range(2):  # inner steps past the last round's end, before its outer step is awaited
            self.micro_batch()
        self.optimizer.state_averager.step(wait_for_delayed_updates=True)
        self.check()
        self.outcomes = self.optimizer.grad_averager.settle_rounds()


def main() -> None:
    run_toml, initial_peer, seed, rounds, out = sys.argv[1:]
    torch.set_num_threads(1)
    run = RunConfig.load(run_toml)
    dht = hivemind.DHT(initial_peers=[initial_peer], host_maddrs=[LOOPBACK_MADDR], start=True)
    peer = OverlapPeer(dht, run, int(seed))
    try:
        peer.train(int(rounds))
    finally:
        peer.optimizer.shutdown()
        dht.shutdown()
    result = dict(
        checks=peer.checks,
        applied_late=peer.applied_late,
        mismatches=peer.mismatches,
        outcomes=[outcome.value for outcome in peer.outcomes],
        state_loads=peer.state_loads,
    )
    Path(out + ".json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
