"""Commands that tests run many of, such as a CLI fed one bad input after another: run at once.

Each is a process that imports torch and transformers before it reads its input (several seconds
on two cores); run together, a set of them costs about the CPU time they need rather than the sum
of their start-ups.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


def run_at_once(commands: Sequence[Sequence[str]], timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Run every command at the same time; their results, in order."""
    processes = [
        subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results
