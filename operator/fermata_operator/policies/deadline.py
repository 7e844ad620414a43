"""``spec.deadline``: a wall-clock limit for the whole run, counted from its first pod's start.

At the deadline the run is checkpointed and stopped (phase ``Stopped``, reason
``DeadlineExceeded``, decision NO-GO). Before it, the spot policy moves new pods to on-demand
when the time left no longer covers the training left with a cushion
(:func:`fermata_operator.policies.spot.capacity_for`).
"""

from __future__ import annotations

from datetime import datetime

from fermata_api import Phase, TrainingRunSpec, parse_duration
from fermata_operator.policies.effects import Stop, Verdict


def seconds_left(spec: TrainingRunSpec, started: datetime | None, now: datetime) -> float | None:
    """Seconds until the deadline (None: no deadline, or the run has not started)."""
    if not spec.deadline or started is None:
        return None
    return parse_duration(spec.deadline) - (now - started).total_seconds()


def evaluate(spec: TrainingRunSpec, started: datetime | None, now: datetime) -> Verdict:
    left = seconds_left(spec, started, now)
    v = Verdict()
    if left is None:
        return v
    if left <= 0:
        v.stop = Stop(Phase.stopped, "DeadlineExceeded", f"deadline {spec.deadline} reached")
        return v
    return v.wake(left)
