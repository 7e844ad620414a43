"""``spec.suspend``: checkpoint, release the GPU and hold the run; ``false`` resumes it.

Suspending stops the run's live pods (the trainer checkpoints on SIGTERM) and holds the run in
phase ``Suspended``; its cost history stays. A pod that was lost to an interruption while the
run was being suspended still counts as an interruption. Resuming creates the next pod as a new
incarnation, resuming from the last checkpoint.
"""

from __future__ import annotations

from fermata_api import conditions as cond
from fermata_operator.policies.effects import Verdict

SUSPENDED_MESSAGE = "suspended: set spec.suspend=false to resume from the last checkpoint"


def suspending(already_suspended: bool) -> Verdict:
    v = Verdict()
    if not already_suspended:
        v.event("Normal", "Suspended", "checkpointing and releasing the GPU")
    v.condition(cond.SUSPENDED, True, "Suspended", SUSPENDED_MESSAGE)
    v.condition(cond.READY, False, "Suspended", SUSPENDED_MESSAGE)
    return v


def resuming() -> Verdict:
    v = Verdict().event("Normal", "Resumed", "resuming from the last checkpoint")
    return v.condition(cond.SUSPENDED, False, "Resumed", "resumed")
