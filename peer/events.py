"""A peer's machine-readable account of what it did: one JSON object a line, appended as it happens.

Events: "join_retry" (attempt, wait: seconds before the next; no initial peer answered the DHT
node's ping), "joined" (peer_id, run_id, epoch, addresses), "state_loaded" (epoch, resync),
"state_refused" (donor: its peer id, problem: what did not fit; once per donor), "epoch" (epoch,
rounds: the outcomes of the gradient rounds that ended with it, round_problems: one line for each
of them that did not succeed (the averaged fraction and each failed reducer's error), round_timings:
[group size, seconds from looking for a group to the all-reduce, seconds of all-reduce] of each of
them that formed a group (peer.averager.RoundTiming), state_rounds:
[outcome, group size] of each state averaging round that ended since the last epoch, off_swarm,
state_loads: the states loaded so far (hivemind's own catching up included), group_states_taken:
the state rounds so far that gave this peer, behind its group, their later epoch's state and epoch,
inner_steps: DiLoCo's local steps so far, samples_contributed and compute_seconds so far,
train_loss: the mean loss of the micro_batches contributed in the epoch, step_seconds: the
optimizer step that ended it, all-reduce and update included, optimizer_steps: the step count in
the shared optimizer's state, learning_rate: its first group's), "out_of_memory" (epoch,
micro_batch: the halved micro-batch the peer goes on with), "stopped" (the PeerSummary). Every
event has "event" and "time" (Unix seconds). Tests, benchmarks and tools read these, not the human
log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Appends events to a JSON-lines file; each line is written and flushed whole."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_events(path: str | Path) -> list[dict]:
    """The events written so far (a line still being written is left out)."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return events
