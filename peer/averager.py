"""Starling's gradient averager: hivemind's GradientAverager, counting how its rounds end."""

from __future__ import annotations

from hivemind.optim.grad_averager import GradientAverager


class CountingGradientAverager(GradientAverager):
    """Counts all-reduce rounds that delivered an average and rounds that failed or timed out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds_succeeded = 0
        self.rounds_failed = 0

    def step(self, *args, wait: bool = True, **kwargs):
        control = super().step(*args, wait=False, **kwargs)
        control.add_done_callback(self._count_outcome)
        return control.result() if wait else control

    def _count_outcome(self, control) -> None:
        if control.cancelled() or control.exception() is not None:
            self.rounds_failed += 1
        else:
            self.rounds_succeeded += 1
