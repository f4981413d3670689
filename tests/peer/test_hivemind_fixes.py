"""The corrections peer.hivemind_fixes makes to hivemind, each checked against the behaviour it fixes."""

import math

import torch
from hivemind.averaging.control import StepControl
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import get_dht_time

import peer.averager  # noqa: F401  (applies peer.hivemind_fixes, as every averaging process does)


class SignalProbe:
    """Stands for the averager's end of a step's trigger and cancel futures: records whether the step
    already reads as cancelled when each signal arrives (what the averager's process checks first)."""

    def __init__(self) -> None:
        self.step = None
        self.cancelled_when_signalled: list[bool] = []
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        self.cancelled_when_signalled.append(self.step.cancelled())
        self._done = True
        return True

    def set_result(self, _) -> None:
        self.cancelled_when_signalled.append(self.step.cancelled())
        self._done = True


def test_a_cancelled_step_reads_cancelled_before_the_averager_is_signalled():
    """The averager's process wakes on the trigger or cancel signal and then reads step.cancelled();
    with hivemind's order it could read False and keep matching the cancelled step into groups."""
    MPFuture()  # starts this process's future backend (a StepControl first would start it on its own class)
    step = StepControl(
        scheduled_time=get_dht_time() + 5, deadline=math.inf, allow_retries=True, weight=1.0, data_for_gather=b""
    )
    trigger, cancel = SignalProbe(), SignalProbe()
    trigger.step = cancel.step = step
    step.attach(trigger, cancel)

    assert step.cancel()

    assert step.cancelled()
    assert trigger.cancelled_when_signalled == [True]
    assert cancel.cancelled_when_signalled == [True]


def test_creating_the_optimizer_state_leaves_the_parameters_as_they_were():
    """hivemind creates optimizer state with a step on zero gradients; with weight decay at the run's
    learning rate that step shrank every parameter before training began."""
    from hivemind.optim import state_averager

    torch.manual_seed(0)
    for make in (
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    ):
        parameters = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
        before = [p.detach().clone() for p in parameters]
        optimizer = make(parameters)
        state_averager.initialize_optimizer_state_(optimizer)
        assert all(torch.equal(p, b) for p, b in zip(parameters, before))
        assert optimizer.state[parameters[0]] and optimizer.param_groups[0]["lr"] == 0.1  # state made, lr back
