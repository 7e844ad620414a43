"""Checkpoints that fit the notice: warn when the last checkpoint nearly filled the grace period.

On SIGTERM (a spot interruption, a suspend, a stop) the trainer writes a checkpoint and has the
pod's ``terminationGracePeriodSeconds`` to finish it; one still being uploaded when the grace
period ends is lost, and the next pod resumes from the one before. The trainer reports how long
its last checkpoint took (``status.lastCheckpoint.durationSeconds``: serialising the state,
hashing and uploading every object, then the manifest). When that is more than
:data:`AT_RISK_FRACTION` of the grace period, condition ``CheckpointAtRisk`` is True, with a
Warning Event when it turns True; a later checkpoint that is fast again sets it False. A
checkpoint without a recorded duration (a trainer from before durations were recorded) says
nothing, except to lift a warning it can no longer back.
"""

from __future__ import annotations

import math

from fermata_api import CheckpointRef
from fermata_api import conditions as cond
from fermata_operator.policies.effects import Verdict

#: Above this fraction of the grace period a checkpoint is at risk of being cut off.
AT_RISK_FRACTION = 0.8
#: What an AWS spot interruption notice gives, however long the grace period is.
SPOT_NOTICE_SECONDS = 120


def _size(size_bytes: int | None) -> str:
    return "" if size_bytes is None else f", {size_bytes / 1e9:.2f} GB"


def _taken(last: CheckpointRef, duration: float, grace_seconds: int) -> str:
    return (
        f"the last checkpoint (step {last.step}{_size(last.size_bytes)}) took {duration:.1f} s of the "
        f"{grace_seconds} s grace period ({duration / grace_seconds:.0%})"
    )


def _advice(duration: float) -> str:
    needed = math.ceil(duration / AT_RISK_FRACTION)
    return (
        f"raise spec.resources.terminationGracePeriodSeconds to at least {needed} s; checkpoint "
        "more often (training.checkpointEverySteps) so that less is lost when one is cut off; "
        "use faster storage (a bucket in the nodes' region); a smaller storage.keepLast does not "
        f"help. A spot notice gives ~{SPOT_NOTICE_SECONDS} s whatever the grace period"
    )


def evaluate(last: CheckpointRef | None, grace_seconds: int, at_risk: bool) -> Verdict:
    """The verdict on ``last`` (``status.lastCheckpoint``) against the pod's grace period;
    ``at_risk``: the CheckpointAtRisk condition is already True (no second Event)."""
    v = Verdict()
    if last is None:
        return v
    duration = last.duration_seconds
    if duration is None:
        if at_risk:
            v.condition(
                cond.CHECKPOINT_AT_RISK,
                False,
                "DurationUnknown",
                f"the last checkpoint (step {last.step}) did not record how long it took",
            )
        return v
    taken = _taken(last, duration, grace_seconds)
    if duration > AT_RISK_FRACTION * grace_seconds:
        message = f"{taken}, over {AT_RISK_FRACTION:.0%}: {_advice(duration)}"
        v.condition(cond.CHECKPOINT_AT_RISK, True, "CheckpointNearGracePeriod", message)
        if not at_risk:
            v.event("Warning", "CheckpointAtRisk", message)
        return v
    return v.condition(cond.CHECKPOINT_AT_RISK, False, "WithinGracePeriod", taken)
