"""Spot recovery policy: separate budgets for interruptions and failures, backoff, fallback.

* An interruption (see :mod:`fermata_operator.pod_outcome`) recreates the pod, resuming from
  ``status.lastCheckpoint``, after ``backoffSeconds · 2^(n-1)`` capped at ``maxBackoffSeconds``;
  it counts against ``spot.maxInterruptions`` only.
* An application failure counts against ``failures.maxRetries`` only, with its own backoff.
* After ``spot.fallbackToOnDemandAfter`` interruptions (when > 0) — or when the deadline no
  longer leaves room for more interruptions — the next pods go to on-demand capacity.
"""

from __future__ import annotations

from datetime import datetime

from fermata_operator.api import CapacityType, TrainingRunSpec
from fermata_trainer.contract import parse_duration


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
        return (
            CapacityType.on_demand,
            f"{interruptions} spot interruptions (fallback after {after})",
        )
    if spec.deadline and started is not None and remaining_train_seconds is not None:
        left = parse_duration(spec.deadline) - (now - started).total_seconds()
        # Spot loses time to interruptions: keep a 25% cushion before the deadline.
        if left < remaining_train_seconds * 1.25:
            return CapacityType.on_demand, (
                f"deadline {spec.deadline} leaves {left:.0f}s for ~{remaining_train_seconds:.0f}s of training"
            )
    return CapacityType.spot, "spot"
