"""``spec.ttlSecondsAfterFinished``: when a finished run's objects are deleted.

A run that reached a terminal phase keeps its pods (their logs), its trainer ConfigMap and its
ServiceAccount, Role and RoleBinding until ``ttlSecondsAfterFinished`` seconds after
``status.completionTime``; then they are deleted (the controller deletes only objects the run
controls) and ``status.cleanedUp`` records when. ``spec.cleanup.deleteRun`` deletes the
TrainingRun as well. Nothing is deleted while a pod still runs or holds its cost finalizer (its
billed span is not recorded yet): the planner asks again once the pods have settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fermata_api import TERMINAL_PHASES, Phase, TrainingRunSpec
from fermata_api import conditions as cond
from fermata_operator.policies.effects import Event, SetCondition

REASON = "CleanedUp"


@dataclass(frozen=True)
class CleanupVerdict:
    """``clean``: delete the run's objects now; ``delete_run``: delete the TrainingRun (once its
    objects are gone); ``wake_in``: seconds until the TTL expires (nothing to do before)."""

    clean: bool = False
    delete_run: bool = False
    wake_in: float | None = None


def evaluate(
    spec: TrainingRunSpec,
    phase: Phase | None,
    completion_time: datetime | None,
    cleaned_up: datetime | None,
    now: datetime,
) -> CleanupVerdict:
    """What the TTL asks for now (pure; ``now`` is the pass's clock)."""
    ttl = spec.ttl_seconds_after_finished
    if ttl is None or phase not in TERMINAL_PHASES or completion_time is None:
        return CleanupVerdict()
    delete_run = spec.cleanup is not None and spec.cleanup.delete_run
    if cleaned_up is not None:
        return CleanupVerdict(delete_run=delete_run)
    left = ttl - (now - completion_time).total_seconds()
    if left > 0:
        return CleanupVerdict(wake_in=left)
    return CleanupVerdict(clean=True, delete_run=delete_run)


def message(ttl: int, delete_run: bool) -> str:
    what = "pods, ConfigMap, ServiceAccount, Role and RoleBinding deleted"
    tail = "; deleting the TrainingRun" if delete_run else "; status, cost history and artifacts kept"
    return f"{ttl}s after the run finished (ttlSecondsAfterFinished): {what}{tail}"


def recorded(ttl: int, delete_run: bool) -> tuple[SetCondition, Event]:
    """The condition and Event that record a cleanup."""
    text = message(ttl, delete_run)
    return SetCondition(cond.CLEANED_UP, True, "TTLExpired", text), Event("Normal", REASON, text)
