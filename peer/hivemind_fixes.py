"""Where hivemind 1.1.12 itself is wrong, corrected in one place: `apply()` (idempotent).

Cancelling a pre-scheduled averaging step (`StepControl.cancel`) must be seen by the averager's
process as a cancellation. hivemind signals the averager first (it resolves the step's `_cancel`
future, which travels through a pipe) and marks the step cancelled in shared memory afterwards.
The averager wakes on the signal and reads `step.cancelled()`; when it runs before the caller's
next line, it reads False, takes the wake-up for the end of matchmaking and goes on looking for a
group with the cancelled step. That step then holds the matchmaking lock ("Another look_for_group
is already in progress"), joins the next group a partner forms, and averages stale buffers into
the partner's round; the step that was meant for that round finds nobody ("could not find a
group") and the optimizer waits for it up to the averaging timeout. hivemind.Optimizer cancels
pre-scheduled rounds whenever it believes it is alone, so two peers of fast epochs met this in
about half of their runs. Fixed by marking the step cancelled before anything is signalled.
"""

from __future__ import annotations

from hivemind.averaging.control import StepControl
from hivemind.utils.mpfuture import MPFuture


def _cancel_step(self: StepControl) -> bool:
    """StepControl.cancel, with the step marked cancelled before its trigger and cancel signals go out."""
    cancelled = MPFuture.cancel(self)
    if self._trigger is not None:
        self._trigger.cancel()
    if self._cancel is not None and not self._cancel.done():
        self._cancel.set_result(None)
    return cancelled


_HIVEMIND_CANCEL = StepControl.cancel


def apply() -> None:
    """Install the corrections above into hivemind's classes."""
    StepControl.cancel = _cancel_step


def revert() -> None:
    """Put hivemind's own code back: for measuring what the corrections change (benchmarks/rounds.py)."""
    StepControl.cancel = _HIVEMIND_CANCEL
