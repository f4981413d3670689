"""Starling's averagers: hivemind's with robust aggregation, and the gradient averager counting how its rounds end."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.optim.grad_averager import GradientAverager
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.timed_storage import get_dht_time

from peer.robust import CenteredClipAllReduceRunner

RUNNERS: dict[str, type[AllReduceRunner]] = {"centered-clip": CenteredClipAllReduceRunner, "mean": AllReduceRunner}


class AggregatingAverager(DecentralizedAverager):
    """hivemind's DecentralizedAverager whose reducers combine their parts with the run's aggregation
    ("centered-clip" or hivemind's weighted "mean")."""

    def __init__(self, *args, aggregation: str = "centered-clip", **kwargs) -> None:
        self.runner_class = RUNNERS[aggregation]
        super().__init__(*args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: bytes | None = None, **kwargs) -> None:
        """DecentralizedAverager's in-place all-reduce, with runner_class in place of AllReduceRunner."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = self.runner_class(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                   group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
        assert group_id in self._running_groups, f"group {group_id} was not registered for all-reduce"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("auxiliary peers do not receive averaged tensors")


class CountingGradientAverager(GradientAverager, AggregatingAverager):
    """hivemind's GradientAverager with the run's aggregation (AggregatingAverager), counting all-reduce
    rounds that delivered an average and rounds that failed or timed out, and loading no state."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds_succeeded = 0
        self.rounds_failed = 0

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None) -> None:
        """Nothing to load. hivemind.Optimizer downloads its gradient averager's state (another
        peer's gradient buffers, as large as the model) right after the training state, and discards
        it: the accumulated gradients are reset after a load anyway."""
        return None

    def step(self, *args, wait: bool = True, **kwargs):
        control = super().step(*args, wait=False, **kwargs)
        control.add_done_callback(self._count_outcome)
        return control.result() if wait else control

    def _count_outcome(self, control) -> None:
        if control.cancelled() or control.exception() is not None:
            self.rounds_failed += 1
        else:
            self.rounds_succeeded += 1
