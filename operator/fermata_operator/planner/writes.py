"""When a planned status is worth a write (it bounds steady-state API traffic)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fermata_api import parse_time
from fermata_operator.planner.model import TRAINER_KEYS, Plan

#: Running totals: written at most every ``min_cost_interval`` seconds.
_RUNNING_COST = ("updated", "accruedUSD", "remainingUSD", "projectedTotalUSD")


def _stable(d: dict[str, Any]) -> dict[str, Any]:
    """The status without the figures that move on every pass."""
    out = {
        k: v for k, v in d.items() if k not in TRAINER_KEYS and k not in {"message", "eta", "progressPercent"}
    }
    cost = {k: v for k, v in (out.get("cost") or {}).items() if k not in _RUNNING_COST}
    cost["segments"] = [
        {k: v for k, v in s.items() if k != "usd"} for s in cost.get("segments") or [] if s.get("end")
    ]
    out["cost"] = cost
    out["conditions"] = [{k: v for k, v in c.items() if k != "message"} for c in out.get("conditions") or []]
    return out


def _without_clock(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "cost": {k: v for k, v in (d.get("cost") or {}).items() if k != "updated"}}


def status_changed(old: dict[str, Any], new: dict[str, Any], min_cost_interval: float, now: datetime) -> bool:
    """Whether the operator-owned status differs enough to be written now.

    Anything but running totals (cost figures, the ETA, condition messages) is written at once;
    running totals at most every ``min_cost_interval`` seconds.
    """
    if _stable(old) != _stable(new):
        return True
    if _without_clock(old) == _without_clock(new):
        return False  # only the computation time moved (a terminal run, say): nothing to write
    updated = parse_time((old.get("cost") or {}).get("updated"))
    return updated is None or (now - updated).total_seconds() >= min_cost_interval


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) that turns ``old`` into ``new``: what ``new`` dropped, at
    any depth, is sent as null (a merge patch otherwise keeps it); lists are replaced whole."""
    body: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        body[key] = (
            merge_patch(before, value) if isinstance(value, dict) and isinstance(before, dict) else value
        )
    for key in old:
        if key not in new:
            body[key] = None
    return body


def first_write_hold(old: dict[str, Any], plan: Plan, hold_seconds: float, now: datetime) -> float | None:
    """Seconds the run's first status write may wait, or None to write now.

    A new run's first pass creates its first pod (the trainer's, or the preparation pod's with
    ``spec.preparation.mode: Pod``), and the pod is bound to a node a fraction of a second
    later; written at once, "pod created" and "placed on node X" are two status writes (the
    costliest requests a run makes of the API server: each one validates and stores the whole
    object). So the status that only records a just-created, not yet placed first pod waits
    until the pod is placed — the pod's binding wakes the run, and one write says both — or for
    at most ``hold_seconds`` after the pod's creation. Nothing else waits: a pass that stops a
    pod, releases a finalizer, deletes or cleans up writes at once (its status is what makes
    those safe), and so does every later pod (an interruption's record is never held).
    """
    if hold_seconds <= 0 or old.get("pod") or old.get("phase"):
        return None
    if plan.stop_pods or plan.release_finalizers or plan.cleanup or plan.delete_run:
        return None
    pod = plan.status.get("pod") or (plan.status.get("preparer") or {}).get("pod") or {}
    created = parse_time(pod.get("created"))
    if plan.status.get("phase") != "Pending" or pod.get("nodeName") or created is None:
        return None
    left = hold_seconds - (now - created).total_seconds()
    return left if left > 0 else None
