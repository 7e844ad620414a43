"""The preparation phase (``spec.preparation.mode: Pod``): sequencing only.

::

    no preparation pod ─► wait out a backoff, or create <run>-prep-<n> (priced, or PriceUnknown)
    Queued / Unscheduled / Starting ─► Pending, Prepared=False
    Running ─────► Preparing (files done / total, ETA), idle policy of the preparation
    Succeeded ───► verified (its own Completed report) → Prepared=True, the training pod next
    ConfigError ─► Failed            Failed ─► retry policy      Interrupted ─► spot policy
    Stopped ─────► next preparation pod (our own stop: a suspend)

The decisions are :mod:`fermata_operator.policies.preparation`'s; this module keeps the
preparation pod's incarnation and counters (``status.preparer``) moving in the same write.
"""

from __future__ import annotations

from datetime import timedelta

from fermata_api import Phase, PodStatusSummary, PreparerStatus
from fermata_api import conditions as cond
from fermata_operator import podspec
from fermata_operator.planner import pods as trainer_pods
from fermata_operator.planner import stopping
from fermata_operator.planner.context import Pass, prep_pod_name
from fermata_operator.planner.model import Plan
from fermata_operator.policies import preparation, prices
from fermata_operator.policies.pod_outcome import TERMINATING_PATIENCE_SECONDS, Kind, Outcome
from fermata_operator.views import PodView


def prepare(p: Pass) -> Plan | None:
    """The preparation phase's plan, or None once the dataset is verified (then the caller
    goes on to the training pod, in the same pass)."""
    assert p.spec is not None
    st = p.st
    tr = st.preparer = st.preparer.model_copy() if st.preparer is not None else PreparerStatus()
    name = prep_pod_name(p.name, tr.incarnation)
    pod = next((v for v in p.pods if v.name == name), None)
    outcome = p.outcomes.get(name)
    if pod is None and tr.pod is not None and tr.pod.name == name and tr.pod.node_name:
        outcome = Outcome(Kind.interrupted, "PodVanished", f"pod {name} disappeared", None, True)
    if outcome is None:
        return _start(p, tr, name)
    if pod is not None:
        _track(p, tr, pod, outcome)
    _admitted(p, tr, outcome)
    kind = _kind(p, name, outcome)
    if kind in {Kind.queued, Kind.unscheduled, Kind.starting}:
        return _waiting(p, name, outcome)
    if kind is Kind.running:
        return _running(p, tr, name, outcome)
    if kind is Kind.succeeded:
        return _succeeded(p, tr, name, outcome)
    if kind is Kind.config_error:
        v = preparation.on_config_error(name, outcome)
        p.apply(v)
        p.set_condition(
            cond.PREPARED, False, "PreparationFailed", v.stop.message if v.stop else outcome.message
        )
        assert v.stop is not None
        return stopping.stop(p, v.stop)
    if kind is Kind.stopped:
        return _superseded(p, tr, pod)
    return _lost(p, tr, name, outcome)


def _admitted(p: Pass, tr: PreparerStatus, outcome: Outcome) -> None:
    """Its scheduling gates are gone, or it has a node: clear Queued / WaitingForCapacity."""
    st = p.st
    if outcome.kind is not Kind.queued and cond.is_true(st.conditions, cond.QUEUED):
        p.set_condition(cond.QUEUED, False, "Admitted", "the pod's scheduling gates were removed")
    waited = st.waiting_for_capacity_since is not None or cond.get(st.conditions, cond.WAITING_FOR_CAPACITY)
    if outcome.kind not in {Kind.queued, Kind.unscheduled} and waited:
        st.waiting_for_capacity_since = None
        node = tr.pod.node_name if tr.pod else None
        p.set_condition(cond.WAITING_FOR_CAPACITY, False, "Scheduled", f"placed on {node}")


def _kind(p: Pass, name: str, outcome: Outcome) -> Kind:
    """The outcome's kind — but one that finished, verified, just as it was taken away succeeded."""
    finished = outcome.exit_code == 0 and outcome.finished is not None
    if outcome.kind is Kind.interrupted and finished:
        verified = preparation.on_success(p.st.preparation, name, outcome, p.now).verified
        return Kind.succeeded if verified else outcome.kind
    return outcome.kind


def _start(p: Pass, tr: PreparerStatus, name: str) -> Plan:
    assert p.spec is not None
    spec, st = p.spec, p.st
    blocked = trainer_pods.blocked(p)
    if blocked is not None:
        return blocked
    if tr.retry_after is not None and tr.retry_after > p.now:
        st.phase = st.phase or Phase.pending
        p.requeue.append((tr.retry_after - p.now).total_seconds())
        return p.finish()
    res = spec.preparation.resources
    # The training pod's prices too: no preparation is spent on a run that could not train.
    missing = prices.unpriced(res.instance_types, [res.capacity], p.obs.prices, spec.budget.prices)
    missing += prices.unpriced_types(
        spec.resources, [spec.resources.capacity], p.obs.prices, spec.budget.prices
    )
    if missing:
        return trainer_pods.price_unknown(p, missing)
    refused = trainer_pods.team_budget_refuses(p, spec.resources.capacity)
    if refused is not None:
        return refused
    run = p.obs.run
    p.plan.create.extend(podspec.trainer_rbac(run, spec.service_account))
    p.plan.create.append(podspec.preparation_pod(run, spec, p.settings, incarnation=tr.incarnation))
    tr.pod = PodStatusSummary(name=name, incarnation=tr.incarnation, phase="Pending", created=p.now)
    tr.retry_after = None
    st.phase = Phase.pending if st.phase in (None, Phase.running, Phase.preparing) else st.phase
    st.message = f"created preparation pod {name} on {res.capacity.value} CPU capacity"
    if tr.incarnation:
        st.message += ", resuming the code cache"
    p.set_condition(cond.PREPARED, False, "PodCreated", st.message)
    p.set_condition(cond.READY, False, "Preparing", st.message)
    p.event("Normal", "PodCreated", st.message)
    return p.finish()


def _track(p: Pass, tr: PreparerStatus, pod: PodView, outcome: Outcome) -> None:
    tr.pod = trainer_pods.summarize(p, pod, outcome, tr.incarnation, tr.pod)


def _waiting(p: Pass, name: str, outcome: Outcome) -> Plan:
    st = p.st
    st.phase = Phase.pending
    message = f"preparation pod {name}: {outcome.message}"
    if outcome.kind is Kind.unscheduled:
        st.waiting_for_capacity_since = st.waiting_for_capacity_since or p.now
        if not cond.is_true(st.conditions, cond.WAITING_FOR_CAPACITY):
            p.event("Normal", "WaitingForCapacity", message)
        p.set_condition(cond.WAITING_FOR_CAPACITY, True, outcome.reason, message)
    elif outcome.kind is Kind.queued:
        if not cond.is_true(st.conditions, cond.QUEUED):
            p.event("Normal", "Queued", message)
        p.set_condition(cond.QUEUED, True, outcome.reason, outcome.message)
    p.set_condition(cond.PREPARED, False, outcome.reason, message)
    p.set_condition(cond.READY, False, "Preparing", message)
    st.message = message
    return p.finish()


def _running(p: Pass, tr: PreparerStatus, name: str, outcome: Outcome) -> Plan:
    assert p.spec is not None
    st = p.st
    report = preparation.own_report(st.preparation, name)
    if st.phase is not Phase.preparing:
        node = tr.pod.node_name if tr.pod else None
        p.event("Normal", "Preparing", f"preparation pod {name} running on {node}")
    st.phase = Phase.preparing
    pod_started = outcome.started or (tr.pod.started if tr.pod else None) or p.now
    tr.started_at = tr.started_at or pod_started
    message = preparation.progress_message(report, name)
    st.message = message
    reason = report.state.value if report is not None else "Starting"
    p.set_condition(cond.PREPARED, False, reason, message)
    p.set_condition(cond.READY, False, "Preparing", message)
    v = preparation.idle(p.spec.idle, report, pod_started, tr.started_at, p.now)
    p.apply(v)
    if v.stop is not None:
        p.set_condition(cond.PREPARED, False, "Idle", v.stop.message)
        return stopping.stop(p, v.stop)
    return p.finish()


def _succeeded(p: Pass, tr: PreparerStatus, name: str, outcome: Outcome) -> Plan | None:
    c = preparation.on_success(p.st.preparation, name, outcome, p.now)
    if c.verified:
        tr.prepared, tr.manifest_digest, tr.codes_key = True, c.manifest_digest, c.codes_key
        tr.finished_at = outcome.finished or p.now
        p.set_condition(cond.PREPARED, True, "Verified", c.message)
        p.event("Normal", "Prepared", c.message)
        p.st.waiting_for_capacity_since = None
        return None
    if c.wait:
        p.st.message = c.message
        return p.finish_at(1.0)
    failed = Outcome(Kind.failed, "NotVerified", c.message, 0, False, outcome.started, outcome.finished)
    return _lost(p, tr, name, failed)


def _superseded(p: Pass, tr: PreparerStatus, pod: PodView | None) -> Plan:
    """Our own stop of the preparation pod (a suspend undone): once it has ended, the next one."""
    if (
        pod is not None
        and pod.phase == "Running"
        and pod.container.finished is None
        and (pod.deletion is None or (p.now - pod.deletion).total_seconds() <= TERMINATING_PATIENCE_SECONDS)
    ):
        p.st.message = f"waiting for {pod.name} to exit"
        return p.finish_at(stopping.FINISHING_POLL_SECONDS)
    tr.incarnation += 1
    return p.finish_at(stopping.FINISHING_POLL_SECONDS)


def _lost(p: Pass, tr: PreparerStatus, name: str, outcome: Outcome) -> Plan:
    """Interrupted or failed: count it once, with the incarnation bump in the same write."""
    assert p.spec is not None
    st = p.st
    if outcome.kind is Kind.interrupted:
        tr.interruptions += 1
        tr.last_interruption = f"{outcome.reason}: {outcome.message}"
        v, delay = preparation.on_interruption(p.spec, tr, name, outcome)
    else:
        tr.failures += 1
        v, delay = preparation.on_failure(p.spec, tr, name, outcome)
    p.apply(v)
    if v.stop is not None:
        p.set_condition(cond.PREPARED, False, "PreparationFailed", v.stop.message)
        return stopping.stop(p, v.stop)
    tr.incarnation += 1
    tr.retry_after = p.now + timedelta(seconds=delay)
    st.phase = Phase.pending
    next_name = prep_pod_name(p.name, tr.incarnation)
    st.message = f"waiting {delay:.0f}s before preparation pod {next_name}"
    p.set_condition(cond.PREPARED, False, outcome.reason, f"{name}: {outcome.message}")
    p.set_condition(cond.READY, False, outcome.reason, outcome.message)
    return p.finish_at(max(0.5, delay))
