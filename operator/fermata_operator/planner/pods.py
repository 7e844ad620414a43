"""Creating the next trainer pod (with the trainer identity it runs as), and tracking the current one."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

from fermata_api import (
    CapacityType,
    CreationBlocked,
    Phase,
    PodStatusSummary,
    PreparationMode,
    PreparerStatus,
    TrainerControl,
    TrainingRunSpec,
    TrainingRunStatus,
)
from fermata_api import conditions as cond
from fermata_operator import podspec
from fermata_operator.planner.context import Pass, operator_status
from fermata_operator.planner.model import Plan
from fermata_operator.policies import cost, prices, spot, team_budget
from fermata_operator.policies.effects import Event
from fermata_operator.policies.pod_outcome import Outcome
from fermata_operator.views import PodView

#: After the API server refused one of the run's objects, creation is tried again only after this
#: long (or at once on a spec change): never a hot loop.
BLOCKED_RETRY_SECONDS = 300.0


def spec_hash(spec: TrainingRunSpec) -> str:
    """A digest of what a pod is made from and cannot change under it (``resources``, and the
    ``training`` / ``evaluation`` sections of its config): a change restarts the pod from its
    checkpoint, and the next pod gets the new settings."""
    parts = {k: getattr(spec, k).model_dump(mode="json") for k in ("resources", "training", "evaluation")}
    body = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def refused(plan: Plan, reason: str, message: str, generation: int | None, now: datetime) -> Plan:
    """The plan after the API server refused to create one of its objects (or a name was taken):
    the run says why (``Accepted=False``) and waits — for a spec change, or
    :data:`BLOCKED_RETRY_SECONDS` — instead of retrying hot."""
    st = TrainingRunStatus.model_validate(plan.status)
    st.creation_blocked = CreationBlocked(reason=reason, message=message, generation=generation, time=now)
    for ctype in (cond.ACCEPTED, cond.READY):
        st.conditions = cond.put(st.conditions, ctype, False, reason, message, now, generation)
    st.message, st.pod = message, None
    events = [e for e in plan.events if e.reason != "PodCreated"] + [Event("Warning", reason, message)]
    return Plan(
        status=operator_status(st),
        stop_pods=plan.stop_pods,
        uids=plan.uids,
        release_finalizers=plan.release_finalizers,
        release_if_unstarted=plan.release_if_unstarted,
        events=events,
        requeue_after=BLOCKED_RETRY_SECONDS,
    )


def _blocked(p: Pass) -> Plan | None:
    """Still blocked by an earlier refusal (same spec generation, not yet time to retry)."""
    b = p.st.creation_blocked
    if b is None:
        return None
    retry_at = b.time + timedelta(seconds=BLOCKED_RETRY_SECONDS)
    if b.generation != p.generation or p.now >= retry_at:
        p.st.creation_blocked = None
        return None
    p.accepted = (False, b.reason, b.message)
    p.requeue.append((retry_at - p.now).total_seconds())
    return p.finish()


def _waiting_for_retry(p: Pass) -> Plan | None:
    st = p.st
    if st.retry_after is not None and st.retry_after > p.now:
        st.phase = st.phase or Phase.pending
        p.requeue.append((st.retry_after - p.now).total_seconds())
        return p.finish()
    return None


def _price_unknown(p: Pass, missing: list[str]) -> Plan:
    """Fail safe: no pod while its cost cannot be counted."""
    message = prices.unknown_price_message(missing)
    old = cond.get(p.st.conditions, cond.ACCEPTED)
    if old is None or old.reason != "PriceUnknown" or old.message != message:
        p.event("Warning", "PriceUnknown", message)
    p.accepted = (False, "PriceUnknown", message)
    p.set_condition(cond.READY, False, "PriceUnknown", message)
    p.st.phase = p.st.phase or Phase.pending
    p.st.message = message
    return p.finish()


def _team_budget_refuses(p: Pass, capacity: CapacityType) -> Plan | None:
    """A run that never started gets its first pod only if the team budgets selecting it can
    cover its first hour (at the highest price of its allowed instance types)."""
    assert p.spec is not None
    if not p.obs.team_budgets and cond.get(p.st.conditions, cond.TEAM_BUDGET) is not None:
        p.set_condition(cond.TEAM_BUDGET, True, "NoTeamBudget", "no team budget selects the run")
    if not p.obs.team_budgets or p.st.start_time is not None:
        return None
    types = p.spec.resources.instance_types
    found = [p.obs.prices.lookup(t, capacity.value, p.spec.budget.prices) for t in types]
    hourly = None if not found or None in found else max(f for f in found if f is not None)
    v = team_budget.admit(p.obs.team_budgets, hourly, p.now)
    old = cond.get(p.st.conditions, cond.TEAM_BUDGET)
    p.apply(v)
    refusal = next((c for c in v.conditions if not c.status), None)
    if refusal is None:
        return None
    if old is None or old.reason != refusal.reason:
        p.event("Warning", refusal.reason, refusal.message)
    p.set_condition(cond.READY, False, refusal.reason, refusal.message)
    p.st.phase, p.st.message = p.st.phase or Phase.pending, refusal.message
    return p.finish()


def _prepared(spec: TrainingRunSpec, st: TrainingRunStatus) -> PreparerStatus | None:
    """spec.preparation.mode Pod: the verified dataset the training pod must find (it never
    tokenizes then)."""
    if spec.preparation.mode is not PreparationMode.pod or st.preparer is None:
        return None
    return st.preparer if st.preparer.prepared else None


def start_next(p: Pass) -> Plan:
    """No current pod: wait out a backoff, or create the next incarnation."""
    assert p.spec is not None
    spec, st = p.spec, p.st
    waiting = _blocked(p) or _waiting_for_retry(p)
    if waiting is not None:
        return waiting
    remaining = cost.remaining_seconds(st.progress, spec)
    capacity, why = spot.capacity_for(spec, st.interruptions, st.start_time, p.now, remaining)
    missing = prices.unpriced_types(spec.resources, [capacity], p.obs.prices, spec.budget.prices)
    if missing:
        return _price_unknown(p, missing)
    refused_by_team = _team_budget_refuses(p, capacity)
    if refused_by_team is not None:
        return refused_by_team
    if st.capacity is not None and st.capacity != capacity.value:
        p.event("Normal", "CapacityChanged", f"next pod on {capacity.value}: {why}")
    # The run's own newest verified checkpoint (its digest checked by the trainer); else a
    # checkpoint of another run only if the user named it.
    own = st.last_checkpoint
    resume = own.uri if own is not None else spec.resume_from
    prepared = _prepared(spec, st)
    run = p.obs.run
    p.plan.create.extend(podspec.trainer_rbac(run, spec.service_account))
    p.plan.create.append(
        podspec.trainer_pod(
            run,
            spec,
            p.settings,
            incarnation=st.incarnation,
            capacity=capacity,
            resume_from=resume,
            resume_digest=own.digest if own is not None else None,
            resume_explicit=own is None and spec.resume_from is not None,
            prepared_manifest_digest=prepared.manifest_digest if prepared else None,
            prepared_codes_key=prepared.codes_key if prepared else None,
        )
    )
    name = p.current_name
    st.pod = PodStatusSummary(
        name=name,
        incarnation=st.incarnation,
        phase="Pending",
        created=p.now,
        spec_hash=spec_hash(spec),
    )
    st.capacity, st.retry_after = capacity.value, None
    if st.phase in (None, Phase.running, Phase.preparing):
        st.phase = Phase.pending
    # A request addressed to an earlier pod (a termination notice, say) is not this pod's.
    if st.control is not None and st.control.checkpoint_request is not None:
        st.control = TrainerControl(stop_report=st.control.stop_report)
    st.message = f"created pod {name} on {capacity.value} capacity" + (
        f", resuming from step {st.last_checkpoint.step}" if st.last_checkpoint else ""
    )
    p.event("Normal", "PodCreated", st.message)
    return p.finish()


def summarize(
    p: Pass, pod: PodView, outcome: Outcome, incarnation: int, prev: PodStatusSummary | None
) -> PodStatusSummary:
    """A pod and its node as status records them; what the pod or node no longer shows (a node
    gone, a start time not yet seen) is kept from ``prev``."""
    node = p.node_of(pod)
    return PodStatusSummary(
        name=pod.name,
        incarnation=incarnation,
        phase=pod.phase,
        node_name=pod.node_name,
        instance_type=(node.instance_type if node else None) or (prev.instance_type if prev else None),
        capacity_type=(node.capacity_type if node else None) or (prev.capacity_type if prev else None),
        created=pod.created,
        started=outcome.started or (prev.started if prev else None),
        uid=pod.uid or (prev.uid if prev else None),
        spec_hash=prev.spec_hash if prev else None,
    )


def track_current(p: Pass, pod: PodView, outcome: Outcome) -> None:
    """Refresh ``status.pod`` from the current pod and its node."""
    p.st.pod = summarize(p, pod, outcome, p.st.incarnation, p.st.pod)


#: Shared with the preparation phase (:mod:`fermata_operator.planner.preparation`).
blocked = _blocked
price_unknown = _price_unknown
team_budget_refuses = _team_budget_refuses
