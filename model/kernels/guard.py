"""Kernels that cannot hurt the swarm.

Under kernels="auto" (on CUDA) and "checked", each Triton kernel is checked against its PyTorch
reference the first time it runs on a device, dtype and shape class: both run on a small slice of
the real inputs, forward and, where the inputs take gradients, backward, and must agree within the
dtype's tolerance. A kernel that raises (it does not compile or launch on this device) or
disagrees is replaced by its reference for the rest of the process, with one warning naming the
kernel and the device; `fallbacks()` lists them (the peer exports their count as a metric). A
kernel that misbehaves would otherwise stop the peer or, worse, send wrong gradients to the swarm.

Faults are declared, not patched in: `declare_faults(KernelFaults(...))` makes named kernels fail,
return a wrong result, or garble their result beyond what the probe sees, so that tests can watch
the guard at work (and the codec's read-back check, peer.codec, that catches the last kind).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("starling.model")

# Forward and gradient agreement required of a kernel, per dtype: about ten times the rounding
# differences measured between the kernels and their references on odd shapes (tests/model/kernels).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-2, rtol=5e-2),
    torch.bfloat16: dict(atol=2e-1, rtol=1e-1),
}
PROBE_SEED = 1234  # the output gradients of the backward check


@dataclass(frozen=True)
class KernelFaults:
    """Kernels (by dispatch name, such as "rms_norm") that raise, return a result off by 1%, or
    (`garbled`) answer the guard's probe right and return their result reversed on the real inputs,
    as a kernel wrong only on large inputs would."""

    failing: frozenset[str] = frozenset()
    wrong: frozenset[str] = frozenset()
    garbled: frozenset[str] = frozenset()


_faults = KernelFaults()
_trusted: set[tuple] = set()  # (kernel, device, dtype, shape class) checked and found right
_fallbacks: dict[str, str] = {}  # "kernel on device" -> what was wrong with it


def declare_faults(faults: KernelFaults) -> None:
    """Inject these faults into the kernels from now on (and forget what was checked so far)."""
    global _faults
    _faults = faults
    _trusted.clear()
    _fallbacks.clear()


def fallbacks() -> dict[str, str]:
    """The kernels replaced by their reference in this process: "name on device" -> the reason."""
    return dict(_fallbacks)


def checked(
    name: str,
    shape_class: tuple,
    fused: Callable[..., object],
    reference: Callable[..., object],
    inputs: Sequence[torch.Tensor],
    probe_inputs: Sequence[torch.Tensor] | None = None,
    **call_options,
) -> object:
    """fused(*inputs, **call_options) once the kernel has agreed with reference(*probe_inputs)
    (a small slice of `inputs`; default: the inputs themselves) for this device, dtype and shape
    class; reference(*inputs, **call_options) if it ever did not."""
    device = inputs[0].device
    kernel = f"{name} on {device}"  # every call: no device query here
    if kernel not in _fallbacks:
        key = (name, str(device), inputs[0].dtype, shape_class)
        if key not in _trusted:
            probe = probe_inputs if probe_inputs is not None else inputs
            problem = _disagreement(_with_faults(name, fused, probing=True), reference, probe)
            if problem is None:
                _trusted.add(key)
            else:
                distrust(name, device, problem)
    if kernel in _fallbacks:
        return reference(*inputs, **call_options)
    return _with_faults(name, fused)(*inputs, **call_options)


def distrust(name: str, device: torch.device, problem: str) -> None:
    """Replace kernel `name` by its reference on `device` for the rest of the process, with one
    warning: `problem` says what was wrong with it."""
    _fallbacks[f"{name} on {device}"] = problem
    logger.warning("kernel %s on %s: %s; using its PyTorch reference from now on", name, _device_name(device), problem)


def _with_faults(name: str, fused: Callable[..., object], probing: bool = False) -> Callable[..., object]:
    if name in _faults.garbled and not probing:

        def garbled(*args, **kwargs):
            result = fused(*args, **kwargs)
            return _map_outputs(result, lambda t: t.copy_(t.flatten().flip(0).view_as(t)))

        return garbled
    if name in _faults.failing:

        def failing(*args, **kwargs):
            raise RuntimeError(f"{name}: injected kernel failure")

        return failing
    if name in _faults.wrong:
        return lambda *args, **kwargs: _map_floats(fused(*args, **kwargs), lambda t: t * 1.01)
    return fused


def _disagreement(
    fused: Callable[..., object], reference: Callable[..., object], inputs: Sequence[torch.Tensor]
) -> str | None:
    """What differs between the two paths on these inputs, or None when they agree."""
    try:
        fused_outputs, fused_grads = _run(fused, inputs)
    except Exception as error:  # a kernel that does not compile or launch here, whatever the cause
        return f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    outputs, grads = _run(reference, inputs)
    for what, got, expected in [
        *(("output", a, b) for a, b in zip(fused_outputs, outputs)),
        *(("gradient", a, b) for a, b in zip(fused_grads, grads)),
    ]:
        if got.shape != expected.shape or got.dtype != expected.dtype:
            theirs, ours = f"{tuple(got.shape)} {got.dtype}", f"{tuple(expected.shape)} {expected.dtype}"
            return f"its {what} is {theirs}, the reference's {ours}"
        if not _close(got, expected):
            error = (got.double() - expected.double()).abs().max().item() if got.is_floating_point() else "exact"
            return f"its {what} differs from the reference's (largest difference {error})"
    return None


def _run(function: Callable[..., object], inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
    """The outputs of function on copies of inputs and, for the inputs that take gradients (with
    grad mode on), their gradients for fixed random output gradients."""
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    leaves = [t.detach().clone().requires_grad_(differentiable and t.requires_grad) for t in inputs]
    # Kernels may work in place (rotary does): hand them non-leaf copies.
    outputs = _as_list(function(*[leaf.clone() if leaf.requires_grad else leaf for leaf in leaves]))
    grads = []
    if differentiable:
        generator = torch.Generator().manual_seed(PROBE_SEED)
        pairs = [(out, torch.randn(out.shape, generator=generator).to(out)) for out in outputs if out.requires_grad]
        wrt = [leaf for leaf in leaves if leaf.requires_grad]
        if pairs:
            found = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(found, wrt)]
    return [out.detach() for out in outputs], grads


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    if not got.is_floating_point():
        return torch.equal(got, expected)
    tolerance = TOLERANCES.get(got.dtype, TOLERANCES[torch.float32])
    return torch.allclose(got.float(), expected.float(), equal_nan=True, **tolerance)


def _as_list(outputs: object) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _map_outputs(outputs: object, change: Callable[[torch.Tensor], torch.Tensor]) -> object:
    return tuple(change(t) for t in outputs) if isinstance(outputs, tuple) else change(outputs)


def _map_floats(outputs: object, change: Callable[[torch.Tensor], torch.Tensor]) -> object:
    if isinstance(outputs, tuple):
        return tuple(change(t) if t.is_floating_point() else t for t in outputs)
    return change(outputs) if outputs.is_floating_point() else outputs


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
