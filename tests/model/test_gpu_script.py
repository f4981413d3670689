"""benchmarks/gpu.py, the one command for a CUDA machine, on a machine without one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would measure it")
def test_without_cuda_the_gpu_script_says_so_in_one_line():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line == "benchmarks/gpu.py: no CUDA device on this machine: nothing to measure"
    assert done.stdout == ""
