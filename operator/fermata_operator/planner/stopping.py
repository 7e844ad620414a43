"""How a run is stopped, whatever decided it (budget, idle, a NO-GO gate, deadline, plateau,
failure): ask a live trainer to checkpoint and exit by itself, SIGTERM it otherwise, and settle.

The stop is recorded at once (phase, ``status.stop``, decision, the abort report's summary and
its JSON in ``status.control.stopReport`` for the trainer to write next to its checkpoints). A
trainer that answered recently gets ``status.control.checkpointRequest {stop: true}`` and
``checkpoint_request_timeout_seconds`` to acknowledge and exit; others are deleted (SIGTERM, on
which the trainer also checkpoints). Terminal runs are then only kept quiet: nothing runs.
"""

from __future__ import annotations

from fermata_api import (
    AbortReport,
    CheckpointRequest,
    Decision,
    GateOutcome,
    StopIntent,
    StopReport,
    TrainerControl,
    report_key,
)
from fermata_api import conditions as cond
from fermata_operator import podspec
from fermata_operator.planner.context import Pass
from fermata_operator.planner.model import Plan
from fermata_operator.policies import cleanup
from fermata_operator.policies.effects import Stop

#: Seconds between looks while a trainer finishes on its own, and while pods wind down.
FINISHING_POLL_SECONDS = 1.0
WINDING_DOWN_POLL_SECONDS = 5.0


def _report(p: Pass, stop: Stop) -> StopReport:
    st = p.st
    return StopReport(
        id=f"{stop.reason.lower()}-{p.now.strftime('%Y%m%dT%H%M%SZ')}",
        phase=stop.phase.value,
        reason=stop.reason,
        decision=stop.decision.value if stop.decision else None,
        message=stop.message,
        time=p.now,
        step=st.progress.step if st.progress else None,
        cost_usd=st.cost.accrued_usd if st.cost else None,
        evidence=dict(st.gates[-1].evidence) if st.gates else {},
    )


def stop(p: Pass, stop: Stop, gate: GateOutcome | None = None) -> Plan:
    """Carry out ``stop`` (``gate``: an outcome to record with it, e.g. the final one)."""
    assert p.spec is not None
    st = p.st
    if gate is not None:
        st.gates = [g for g in st.gates if g.name != gate.name] + [gate]
    report = _report(p, stop)
    st.stop = StopIntent(phase=stop.phase, reason=stop.reason, message=stop.message, time=p.now)
    previous = st.control.checkpoint_request if st.control else None
    st.control = TrainerControl(checkpoint_request=previous, stop_report=report)
    base = p.spec.storage.checkpoints.rstrip("/")
    st.abort_report = AbortReport(
        uri=f"{base}/{report_key(report.id)}", reason=stop.reason, summary=stop.message, time=p.now
    )
    st.phase, st.message, st.retry_after = stop.phase, stop.message, None
    if stop.decision is not None:
        st.decision, st.decision_reason = stop.decision, stop.message
    current = p.current
    for pod in p.active_pods():
        if pod is current and p.trainer_alive(pod.name):
            # Tell the trainer to checkpoint, write the abort report and exit by itself; the pod
            # is SIGTERMed only if it does not within the timeout.
            request = CheckpointRequest(
                id=f"{pod.name}-stop-{stop.reason.lower()}", reason=stop.reason, time=p.now, stop=True
            )
            st.control = TrainerControl(checkpoint_request=request, stop_report=report)
        else:
            p.stop_pod(pod.name, stop.reason)
    if not p.active_pods():
        st.completion_time = p.now
    p.set_condition(cond.READY, False, stop.reason, stop.message)
    p.set_condition(cond.PROGRESSING, False, stop.reason, stop.message)
    if not any(e.reason == stop.reason for e in p.plan.events):  # a NO-GO gate already said it
        p.event("Warning" if stop.decision is Decision.no_go else "Normal", stop.reason, stop.message)
    return p.finish_at(WINDING_DOWN_POLL_SECONDS)


def _finishing_by_itself(p: Pass, pod: str) -> bool:
    """The trainer was asked to checkpoint and exit; give it until it acknowledges or the
    timeout passes (acknowledged: it is writing its abort report and last status)."""
    st = p.st
    req = st.control.checkpoint_request if st.control else None
    if req is None or not req.stop or not req.id.startswith(pod + "-stop"):
        return False
    acked = st.progress is not None and st.progress.checkpoint_request_ack == req.id
    waited = (p.now - req.time).total_seconds()
    return waited < p.settings.checkpoint_request_timeout_seconds and (acked or p.trainer_alive(pod))


def settle_terminal(p: Pass) -> Plan:
    """A terminal run: make sure nothing runs, then stay quiet."""
    waiting = False
    for pod in p.active_pods():
        if _finishing_by_itself(p, pod.name):
            waiting = True
        else:
            p.stop_pod(pod.name, p.st.phase.value if p.st.phase else "stopped")
    busy = bool(p.active_pods())
    if p.st.completion_time is None and not busy:
        p.st.completion_time = p.now
    if waiting:
        return p.finish_at(FINISHING_POLL_SECONDS)
    if busy or p.plan.release_finalizers or any(pod.has_cost_finalizer for pod in p.pods):
        return p.finish_at(WINDING_DOWN_POLL_SECONDS)
    return p.finish_at(clean_up(p))


def clean_up(p: Pass) -> float | None:
    """``spec.ttlSecondsAfterFinished``: once it has passed, the run's pods and its own RBAC go
    (and the run too with ``cleanup.deleteRun``). Called only once every pod has settled (no
    pod runs, every billed span recorded). Returns when to look again (None: only on a change)."""
    assert p.spec is not None
    v = cleanup.evaluate(p.spec, p.st.phase, p.st.completion_time, p.st.cleaned_up, p.now)
    p.plan.delete_run = v.delete_run
    if not v.clean:
        return v.wake_in
    for pod in p.pods:
        p.plan.cleanup.append(("Pod", pod.name))
        p.record_uid(pod.name)
    # The run's own RoleBinding / ServiceAccount, if spec.serviceAccount gave it any (the
    # namespace's trainer identity stays, like the namespace's default ServiceAccount).
    p.plan.cleanup.extend(podspec.run_objects(p.spec.service_account, p.name))
    p.st.cleaned_up = p.now
    condition, event = cleanup.recorded(p.spec.ttl_seconds_after_finished or 0, v.delete_run)
    p.set_condition(condition.type, condition.status, condition.reason, condition.message)
    p.event(event.type, event.reason, event.message)
    return None
