"""Runs the Triton kernels on CPU in Triton's interpreter, and shares the dtype tolerances.

TRITON_INTERPRET must be set before anything imports triton (bitsandbytes, torch._dynamo and
the model all do). Pytest collects tests/model/kernels first of the suite, so this conftest
sets it in time for `pytest` and for `pytest tests/model/kernels`. It stays set (triton
imports more of itself at the first launch and checks it again); it is harmless to the other
tests and their subprocesses: the model takes Triton only on CUDA tensors under kernels="auto".
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tiny_model.py, beside the tests

# Forward and gradient tolerances per dtype (fp32 tight; half precisions at Liger-Kernel's level).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


@pytest.fixture(autouse=True)
def triton_interpreter() -> None:
    """Skips without triton; fails clearly when triton was imported before the interpreter was set."""
    pytest.importorskip("triton")
    from model.kernels._triton import interpreting

    if not interpreting():
        pytest.fail("triton was imported before TRITON_INTERPRET=1: run tests/model/kernels first or alone")


@pytest.fixture
def assert_matches() -> Callable[..., None]:
    """assert_matches(actual, expected, dtype, scale=1.0): close within the dtype's tolerance times scale."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)

    return check
