"""Spot recovery: interruptions have their own budget, an exponential backoff and a fallback.

* An interruption (see :mod:`~fermata_operator.policies.pod_outcome`) recreates the pod,
  resuming from ``status.lastCheckpoint``, after ``backoffSeconds · 2^(n-1)`` capped at
  ``maxBackoffSeconds``; it counts against ``spot.maxInterruptions`` only.
* After ``spot.fallbackToOnDemandAfter`` interruptions (when > 0) — or when the deadline no
  longer leaves room for more interruptions — the next pods go to on-demand capacity.
"""

from __future__ import annotations

from datetime import datetime

from fermata_api import CapacityType, Phase, TrainingRunSpec
from fermata_api import conditions as cond
from fermata_operator.policies import deadline
from fermata_operator.policies.effects import Stop, Verdict
from fermata_operator.policies.pod_outcome import Outcome

#: Spot loses time to interruptions: keep this cushion before the deadline.
DEADLINE_CUSHION = 1.25


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff for the ``attempt``-th retry (1-based)."""
    if attempt <= 0 or base <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (attempt - 1)))


def capacity_for(
    spec: TrainingRunSpec,
    interruptions: int,
    started: datetime | None,
    now: datetime,
    remaining_train_seconds: float | None,
) -> tuple[CapacityType, str]:
    """Capacity for the next pod, with the reason."""
    if spec.resources.capacity is CapacityType.on_demand:
        return CapacityType.on_demand, "spec.resources.capacity is on-demand"
    after = spec.spot.fallback_to_on_demand_after
    if after > 0 and interruptions >= after:
        return CapacityType.on_demand, f"{interruptions} spot interruptions (fallback after {after})"
    left = deadline.seconds_left(spec, started, now)
    if (
        left is not None
        and remaining_train_seconds is not None
        and left < remaining_train_seconds * DEADLINE_CUSHION
    ):
        return CapacityType.on_demand, (
            f"deadline {spec.deadline} leaves {left:.0f}s for ~{remaining_train_seconds:.0f}s of training"
        )
    return CapacityType.spot, "spot"


def on_interruption(
    spec: TrainingRunSpec, count: int, pod_name: str, outcome: Outcome
) -> tuple[Verdict, float]:
    """The ``count``-th interruption (already counted): stop, or wait and recreate the pod."""
    v = Verdict().condition(cond.INTERRUPTED, True, outcome.reason, outcome.message)
    limit = spec.spot.max_interruptions
    if count > limit:
        msg = f"{count} spot interruptions exceed spot.maxInterruptions={limit}"
        v.condition(cond.FAILED, True, "TooManyInterruptions", msg)
        v.stop = Stop(Phase.failed, "TooManyInterruptions", msg)
        return v, 0.0
    delay = backoff_seconds(count, spec.spot.backoff_seconds, spec.spot.max_backoff_seconds)
    v.event(
        "Warning",
        "Interrupted",
        f"pod {pod_name} lost ({outcome.reason}); interruption {count}/{limit}, "
        f"new pod in {delay:.0f}s from the last checkpoint",
    )
    return v, delay
