"""Standard ``status.conditions`` bookkeeping (lastTransitionTime only moves on a change)."""

from __future__ import annotations

from datetime import datetime

from fermata_api.status import Condition

# Condition types a TrainingRun carries.
ACCEPTED = "Accepted"  # the spec is runnable (False: InvalidSpec and friends)
POD_SCHEDULED = "PodScheduled"  # the trainer pod is on a node
WAITING_FOR_CAPACITY = "WaitingForCapacity"  # Pending for lack of a node
QUEUED = "Queued"  # the pod is held by scheduling gates (Kueue has not admitted it yet)
PROGRESSING = "Progressing"  # training steps advance
BUDGET_WARNING = "BudgetWarning"
BUDGET_EXCEEDED = "BudgetExceeded"
IDLE = "Idle"
INTERRUPTED = "Interrupted"  # the last pod was lost to a spot interruption
SUSPENDED = "Suspended"
GATE_PASSED = "GatePassed"  # the latest gate's decision
COMPLETE = "Complete"
FAILED = "Failed"
READY = "Ready"  # summary used by `kubectl wait` and Argo CD
TAMPERED = "Tampered"  # operator-owned status was rewritten by someone else (restored)
CHECKPOINT_AT_RISK = "CheckpointAtRisk"  # the last checkpoint nearly filled the grace period
PREPARED = "Prepared"  # spec.preparation.mode Pod: the prepared dataset is verified
CLEANED_UP = "CleanedUp"  # spec.ttlSecondsAfterFinished: the run's pods, ConfigMap, RBAC deleted


def get(conditions: list[Condition], ctype: str) -> Condition | None:
    return next((c for c in conditions if c.type == ctype), None)


def is_true(conditions: list[Condition], ctype: str) -> bool:
    c = get(conditions, ctype)
    return c is not None and c.status == "True"


def put(
    conditions: list[Condition],
    ctype: str,
    status: bool | str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Return conditions with ``ctype`` set; keeps lastTransitionTime unless status changed."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = get(conditions, ctype)
    new = Condition(
        type=ctype,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=old.last_transition_time if old is not None and old.status == value else now,
        observed_generation=generation,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == ctype else c for c in conditions]


# The team budget (TrainingBudget). On a run: whether the team budgets that select it let it run.
TEAM_BUDGET = "TeamBudget"
# On a TrainingBudget: spend reached warnAtFraction of the cap / reached the cap.
BUDGET_AT_WARNING = "Warning"
BUDGET_EXHAUSTED = "Exhausted"
