"""The checks on a donor's state: what fits this peer's model and optimizer is taken, anything else is
refused with the reason; and the state a donor shares is labelled with the epoch of its parameters."""

import asyncio
import concurrent.futures
import math
import threading
import time
from functools import partial
from types import SimpleNamespace

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID

from coordinator.harness import LOOPBACK_MADDR
from peer.state_loading import (
    CheckedStateAverager,
    DonorCheckingAverager,
    check_metadata_epoch,
    check_optimizer_metadata,
    check_tensors,
    optimizer_state_layout,
)


def adamw_state(shape=(3, 5)) -> tuple[list[torch.Tensor], list[dict], list[torch.Tensor]]:
    """Parameters of a small model, and the flattened state of an AdamW that took one step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape[-1]))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    metadata, tensors = optimizer_state_layout(optimizer)
    return params, metadata, tensors


def test_a_donor_with_the_same_layout_is_taken():
    params, metadata, tensors = adamw_state()
    donor_params, donor_metadata, donor_tensors = adamw_state()
    assert check_tensors([*donor_params, *donor_tensors], [*params, *tensors]) is None
    assert check_optimizer_metadata(donor_metadata, metadata) is None
    assert check_metadata_epoch({"epoch": 7, "optimizer_metadata": donor_metadata}) is None


def test_tensors_of_another_shape_count_or_with_nan_are_refused():
    params, _, tensors = adamw_state()
    other_params, _, other_tensors = adamw_state(shape=(4, 5))
    expected = [*params, *tensors]
    assert check_tensors([*other_params, *other_tensors], expected) == "tensor 0 has shape (4, 5), (3, 5) expected"
    assert check_tensors(expected[:-1], expected) == f"it sent {len(expected) - 1} tensors, {len(expected)} expected"
    poisoned = [tensor.detach().clone() for tensor in expected]
    poisoned[2][0] = math.nan
    assert check_tensors(poisoned, expected) == "tensor 2 holds non-finite values"


@pytest.mark.parametrize(
    "metadata, reason",
    [
        (None, "its metadata is a NoneType, not a dict"),
        ({"epoch": "3"}, "its epoch is '3'"),
        ({"epoch": -1}, "its epoch is -1"),
        ({"epoch": True}, "its epoch is True"),
    ],
)
def test_metadata_without_a_valid_epoch_is_refused(metadata, reason):
    assert check_metadata_epoch(metadata) == reason


def test_optimizer_metadata_of_another_layout_is_refused():
    _, metadata, _ = adamw_state()
    assert "entries" in check_optimizer_metadata(metadata[:-1], metadata)
    lr = next(i for i, entry in enumerate(metadata) if entry == {"type": "value", "value": 1e-3})
    as_text = [*metadata[:lr], {"type": "value", "value": "1e-3"}, *metadata[lr + 1 :]]
    assert (
        check_optimizer_metadata(as_text, metadata) == f"optimizer metadata entry {lr} is '1e-3', like 0.001 expected"
    )
    tensor = next(i for i, entry in enumerate(metadata) if entry["type"] == "tensor")
    moved = [*metadata[:tensor], {"type": "tensor", "index": 99}, *metadata[tensor + 1 :]]
    assert check_optimizer_metadata(moved, metadata) == f"optimizer metadata entry {tensor} points at tensor 99"
    assert "a tensor expected" in check_optimizer_metadata([*metadata[:tensor], 5, *metadata[tensor + 1 :]], metadata)


class SlowSGD(torch.optim.SGD):
    """SGD whose step takes a second, and says when it began: long enough to ask for the state
    while it runs."""

    began = threading.Event()

    def step(self, closure=None):
        self.began.set()
        time.sleep(1.0)
        return super().step(closure)


def shared_state(averager: CheckedStateAverager) -> tuple[int, list[float]]:
    """What a loading peer or the coordinator would download: the epoch and the parameters."""
    metadata, tensors, _ = averager.get_current_state()
    return metadata["epoch"], tensors[0].tolist()


def test_the_state_shared_around_an_optimizer_step_is_labelled_with_its_parameters_epoch():
    """hivemind counts an epoch before its background thread runs the epoch's optimizer step. A
    coordinator that downloaded the state in between wrote a checkpoint of epoch N holding the
    parameters of epoch N - 1 (tests/coordinator/test_swarm.py, fresh-clone make test)."""
    dht = hivemind.DHT(host_maddrs=[LOOPBACK_MADDR], start=True)
    param = torch.nn.Parameter(torch.zeros(4))
    averager = CheckedStateAverager(
        dht=dht,
        optimizer=partial(SlowSGD, lr=1.0),
        params=[param],
        prefix="shared_state",
        offload_optimizer=True,  # as shipped
        start=True,
    )
    trigger = threading.Event()
    try:
        param.grad = torch.ones(4)
        # As hivemind.Optimizer does with delayed steps: the step runs in the background, on a trigger.
        averager.step(
            increment_epoch=True, optimizer_step=True, delay_optimizer_step=True, wait_for_trigger=trigger.wait
        )
        assert averager.local_epoch == 1
        assert shared_state(averager) == (0, [0.0] * 4)  # counted, not run: still epoch 0's parameters
        SlowSGD.began.clear()  # hivemind stepped it once already, to create the optimizer's state
        trigger.set()
        assert SlowSGD.began.wait(timeout=60), "the optimizer step never began"
        assert shared_state(averager) == (1, [-1.0] * 4)  # read once it has run
        averager.step(wait_for_delayed_updates=True)

        # A step that gave up before running (its trigger failed) leaves the parameters to the epoch.
        def failed_trigger():
            raise RuntimeError("the gradients' round failed")

        averager.step(increment_epoch=True, optimizer_step=True, wait_for_trigger=failed_trigger)
        assert averager.local_epoch == 2 and shared_state(averager) == (2, [-1.0] * 4)
    finally:
        trigger.set()  # a step left waiting would keep the process alive
        averager.shutdown()
        dht.shutdown()


class UnansweredOpen:
    """A donor's stub whose stream the libp2p daemon does not open."""

    async def rpc_download_state(self, request):
        return await asyncio.get_running_loop().create_future()


def load_waiting_for_an_open(timeout: float | None, donors: int) -> DonorCheckingAverager:
    """An averager (its process's side) that loads state from `donors` donors whose streams do not
    open."""
    averager = object.__new__(DonorCheckingAverager)  # the attributes a load reads, none of its process
    stub = UnansweredOpen()
    averager.__dict__.update(
        next_chunk_timeout=timeout,
        request_timeout=timeout,
        prefix="test",
        _parent_pid=None,  # no averager process to stop when it is collected
        _p2p=None,
        _refused_donors={},
        _min_state_epoch=SimpleNamespace(value=0),  # shared with the peer's process in a real averager
        _donors_by_priority=lambda: [PeerID(bytes([0, 4, 1, 2, 3, index])) for index in range(donors)],
        get_stub=lambda p2p, peer, namespace: stub,
    )
    return averager


def test_a_donors_stream_that_does_not_open_is_given_up_after_the_part_timeout():
    """Opening a donor's stream is a wait for that donor like each of its messages: a donor whose
    stream does not open within the part timeout is given up, and the next one asked."""

    async def load() -> tuple[object, float]:
        averager = load_waiting_for_an_open(timeout=0.2, donors=2)
        result = concurrent.futures.Future()
        began = time.monotonic()
        await averager._load_state_from_peers(result, timeout=600.0)  # hivemind's load_state_timeout
        return result.result(timeout=0), time.monotonic() - began

    state, seconds = asyncio.run(load())
    assert state is None and 0.4 <= seconds < 2.0  # two donors, 0.2 s each
