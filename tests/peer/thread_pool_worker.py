"""Forks processes as a peer forks its averagers and, in each, from a background thread (as an
averager serves), starts THREADS threads whose first torch operations run at the same moment, as an
averager's compression threads may; prints
{"forks": FORKS, "failed": threads that failed} as JSON. Run by test_hivemind_fixes.py with
OMP_NUM_THREADS=1 (as the harness runs peers)."""

import json
import multiprocessing
import sys
import threading

import torch

from peer import hivemind_fixes

THREADS = 32
FORKS = 100


def first_operations_at_once(failures, replace_pool: bool) -> None:
    if replace_pool:
        hivemind_fixes.replace_torch_thread_pool()  # what every averager's background thread does first
    start, failed = threading.Barrier(THREADS), []

    def first_operation() -> None:
        start.wait()
        try:
            values = torch.randn(1 << 16)
            torch.abs(values, out=torch.empty_like(values))
        except RuntimeError as error:  # "Invalid thread pool!"
            failed.append(error)

    threads = [threading.Thread(target=first_operation) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failures.put(len(failed))


def serve(failures, replace_pool: bool) -> None:
    thread = threading.Thread(target=first_operations_at_once, args=(failures, replace_pool))
    thread.start()
    thread.join()


def main() -> None:
    replace_pool = sys.argv[1:] != ["--without-fix"]
    torch.set_num_threads(1)
    torch.abs(torch.randn(1 << 20))  # the parent has used its thread pool, as a peer has
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    failed = 0
    for _ in range(FORKS):
        child = context.Process(target=serve, args=(failures, replace_pool))
        child.start()
        failed += failures.get(timeout=60)
        child.join(timeout=60)
    print(json.dumps({"forks": FORKS, "failed": failed}))


if __name__ == "__main__":
    main()
