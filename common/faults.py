"""Fault points: a test-only way to kill a service with SIGKILL at an exact place in its code.

A kill from outside lands wherever the process happens to be, nearly always waiting on a socket;
the windows that matter (a file written but not renamed, a record journaled but not acknowledged)
last milliseconds. A fault point names such a window. With the variable unset (always, outside
the chaos tests) :func:`point` is a test of an empty dict: no cost.

    RLBUS_FAULT_POINTS="trainer.before_batch_ack:3,orchestrator.before_result_ack"

kills the process with SIGKILL the 3rd time it reaches ``trainer.before_batch_ack``, or the
first time it reaches ``orchestrator.before_result_ack``, whichever comes first (counts are per
process: a restarted service counts from zero, so restart it without the variable). A name not
in :data:`POINTS` or a count that is not a positive integer stops the service at import with an
error naming it. ``tests/integration/chaos_run.py`` sets the variable per started process.
"""

from __future__ import annotations

import os
import signal
import sys

ENV_VAR = "RLBUS_FAULT_POINTS"

POINTS = {
    "trainer.checkpoint_before_rename": "the step's checkpoint is written (step_N.partial), not renamed yet",
    "trainer.before_batch_ack": "the step's checkpoint is renamed into place, its BatchAck not sent yet",
    "orchestrator.before_result_ack": "an accepted result is journaled, its ResultAck not sent yet",
    "orchestrator.before_compaction": "a step's progress is saved, the journal not compacted yet",
}
"""Every fault point, by name, with the window it kills the process in."""


def parse(spec: str) -> dict[str, int]:
    """``"name[:count],..."`` -> {name: count}; ValueError naming what is wrong."""
    armed: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"{ENV_VAR}: unknown fault point {name!r}; known: {', '.join(sorted(POINTS))}")
        if count and not (count.isdigit() and int(count) >= 1):
            raise ValueError(f"{ENV_VAR}: {item!r} has count {count!r}; expected a positive integer")
        armed[name] = int(count or 1)
    return armed


_armed: dict[str, int] = parse(os.environ.get(ENV_VAR, ""))
"""Point -> reaches left before the kill (1: the next one kills)."""


def arm(spec: str) -> None:
    """Replace the armed points (tests; services read the variable at import)."""
    global _armed
    _armed = parse(spec)


def point(name: str) -> None:
    """Kill this process with SIGKILL here if ``name`` is armed and its count is reached."""
    if _armed and name in _armed:
        _reach(name)


def _reach(name: str) -> None:
    _armed[name] -= 1
    if _armed[name] > 0:
        return
    # Written straight to stderr: nothing that buffers (or a logging thread) may hold the line back.
    sys.stderr.write(f"fault point {name} ({POINTS[name]}): killing pid {os.getpid()} with SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
