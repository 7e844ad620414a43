"""The run's lifecycle: one small function per situation, dispatched by :func:`plan`.

::

    spec invalid ──────────────► Accepted=False (no requeue: a spec change wakes the run)
    terminal phase ────────────► settle: nothing runs, then quiet
    last checkpoint ───────────► CheckpointAtRisk when it nearly filled the grace period
    deadline / budget ─────────► stop
    spec.suspend ──────────────► suspended (pods stopped, GPU released)
    preparation (mode Pod) ────► the preparation pod first (planner/preparation.py), until verified
    no current pod ────────────► wait out a backoff, or create the next incarnation
    current pod:  Queued ──────► Queued (gated: not billed, no idle clock)
                  Unscheduled ─► WaitingForCapacity      Starting ──► Pending
                  Running ─────► idle, plateau, gates, termination notice, ETA
                  Succeeded ───► final gate, Succeeded   ConfigError ► Failed
                  Interrupted ─► spot policy             Failed ────► retry policy
                  Stopped ─────► next incarnation (a superseded pod of ours)

Every decision is a policy's (``policies/``); this module only sequences them and keeps the
incarnation and counters moving in the same status write, so a pod's end is counted once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from pydantic import ValidationError

from fermata_api import (
    TERMINAL_PHASES,
    CheckpointRequest,
    Phase,
    TrainerControl,
    TrainerState,
    TrainingRunSpec,
)
from fermata_api import conditions as cond
from fermata_operator.planner import accounting, pods, stopping
from fermata_operator.planner import preparation as prep
from fermata_operator.planner.context import Pass, pod_name
from fermata_operator.planner.model import Observed, Plan
from fermata_operator.policies import (
    budget,
    checkpoint_risk,
    cost,
    deadline,
    gates,
    idle,
    plateau,
    preparation,
    retry,
    spot,
    suspend,
    team_budget,
)
from fermata_operator.policies.pod_outcome import TERMINATING_PATIENCE_SECONDS, Kind, Outcome
from fermata_operator.settings import OperatorSettings
from fermata_operator.views import PodView


def plan(obs: Observed, settings: OperatorSettings) -> Plan:
    """From what is observed to what should be done. Pure: no I/O, no clock but ``obs.now``."""
    p = Pass.start(obs, settings)
    try:
        p.spec = TrainingRunSpec.model_validate(obs.run.get("spec") or {})
    except ValidationError as exc:
        return invalid_spec(p, exc)
    if obs.tampered:
        tampered(p, obs.tampered)
    accounting.account(p)
    if p.st.phase in TERMINAL_PHASES:
        return stopping.settle_terminal(p)
    if obs.namespace_terminating or obs.run["metadata"].get("deletionTimestamp"):
        return winding_down(p)
    checkpoint_check(p)
    for guard in (deadline_guard, budget_guard, team_budget_guard):
        done = guard(p)
        if done is not None:
            return done
    if p.spec.suspend:
        return suspended(p)
    if p.st.phase is Phase.suspended:
        resume(p)
    if preparation.required(p.spec, p.st):
        preparing = prep.prepare(p)
        if preparing is not None:
            return preparing
    return current_pod(p)


def invalid_spec(p: Pass, exc: ValidationError) -> Plan:
    problems = "; ".join(f"spec.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    old = cond.get(p.st.conditions, cond.ACCEPTED)
    if old is None or old.status == "True":
        p.event("Warning", "InvalidSpec", problems)
    p.accepted = (False, "InvalidSpec", problems)
    p.st.phase = p.st.phase or Phase.pending
    p.st.message = f"invalid spec: {problems}"
    return p.finish_at(None)


def tampered(p: Pass, fields: list[str]) -> None:
    """Someone other than the operator rewrote its status: it was restored from the operator's
    own last write before planning; say so loudly, and act on nothing the forgery implied."""
    names = ", ".join(f"status.{f}" for f in fields)
    message = f"{names} rewritten by someone other than the operator; restored from its own record"
    p.set_condition(cond.TAMPERED, True, "StatusRewritten", message)
    p.event("Warning", "StatusTampered", message)


def winding_down(p: Pass) -> Plan:
    """The run or its namespace is being deleted: nothing new starts and nothing is counted; the
    pods go with their owner, and each one's billed span is recorded before it may go."""
    p.st.message = "being deleted: no new pods"
    for pod in p.active_pods():
        p.stop_pod(pod.name, "Deleting")
    return p.finish_at(stopping.WINDING_DOWN_POLL_SECONDS if p.pods else None)


# ----------------------------------------------------------------------------- guards


def checkpoint_check(p: Pass) -> None:
    """The newest checkpoint against the pod's grace period (CheckpointAtRisk)."""
    assert p.spec is not None
    v = checkpoint_risk.evaluate(
        p.st.last_checkpoint,
        p.spec.resources.termination_grace_period_seconds,
        cond.is_true(p.st.conditions, cond.CHECKPOINT_AT_RISK),
    )
    p.apply(v)


def deadline_guard(p: Pass) -> Plan | None:
    assert p.spec is not None
    v = deadline.evaluate(p.spec, p.st.start_time, p.now)
    p.apply(v)
    return stopping.stop(p, v.stop) if v.stop is not None else None


def budget_guard(p: Pass) -> Plan | None:
    assert p.spec is not None and p.st.cost is not None
    v = budget.evaluate(p.st.cost, p.spec.budget, cond.is_true(p.st.conditions, cond.BUDGET_WARNING))
    p.apply(v)
    return stopping.stop(p, v.stop) if v.stop is not None else None


def team_budget_guard(p: Pass) -> Plan | None:
    """The team budgets selecting a run that has started: warn, or stop it at the cap (a run
    that never started is admitted, or not, before its first pod: :func:`pods.start_next`)."""
    if not p.obs.team_budgets or (p.st.start_time is None and not p.active_pods()):
        return None
    previous = cond.get(p.st.conditions, cond.TEAM_BUDGET)
    v = team_budget.guard(p.obs.team_budgets, previous.reason if previous else None, p.now)
    p.apply(v)
    return stopping.stop(p, v.stop) if v.stop is not None else None


# ----------------------------------------------------------------------------- suspend


def suspended(p: Pass) -> Plan:
    st = p.st
    current, outcome = p.current, p.outcomes.get(p.current_name)
    if current is not None and outcome is not None and outcome.kind is Kind.interrupted:
        # Lost to an interruption while being suspended: it still counts as one.
        st.interruptions += 1
        st.last_interruption = f"{outcome.reason}: {outcome.message}"
        p.set_condition(cond.INTERRUPTED, True, outcome.reason, outcome.message)
    for pod in p.active_pods():
        p.stop_pod(pod.name, "Suspended")
    p.apply(suspend.suspending(st.phase is Phase.suspended))
    st.phase, st.message = Phase.suspended, suspend.SUSPENDED_MESSAGE
    st.waiting_for_capacity_since = None
    if current is not None and outcome is not None and outcome.ended:
        st.incarnation += 1  # the suspended pod is done: the next one is a new incarnation
    return p.finish_at(stopping.WINDING_DOWN_POLL_SECONDS if p.active_pods() else None)


def resume(p: Pass) -> None:
    """Resume: a pod that was never stopped (the suspend was undone before it took effect)
    simply goes on; one that has ended makes room for the next incarnation."""
    p.apply(suspend.resuming())
    p.st.phase = Phase.pending
    current = p.current
    if current is not None and p.outcomes[current.name].ended and not still_running(p, current):
        p.st.incarnation += 1


# ----------------------------------------------------------------------------- the current pod


def current_pod(p: Pass) -> Plan:
    pod, outcome = p.current, p.outcomes.get(p.current_name)
    st = p.st
    if pod is None and st.pod is not None and st.pod.name == p.current_name and st.pod.node_name:
        # We created it and it was placed, but it is gone without us seeing its end.
        outcome = Outcome(Kind.interrupted, "PodVanished", f"pod {p.current_name} disappeared", None, True)
    if outcome is None:
        return pods.start_next(p)
    if pod is not None:
        pods.track_current(p, pod, outcome)
        if p.active(pod) and respec(p, pod):
            return p.finish_at(stopping.WINDING_DOWN_POLL_SECONDS)
    if outcome.kind is not Kind.queued:
        admitted(p)
    if outcome.kind not in {Kind.queued, Kind.unscheduled}:
        placed(p, pod)
    return HANDLERS[outcome.kind](p, pod, outcome)


def respec(p: Pass, pod: PodView) -> bool:
    """``spec.resources``, ``training`` or ``evaluation`` changed since the pod was created:
    restart it from its SIGTERM checkpoint (not an interruption) so the next pod runs with them."""
    assert p.spec is not None
    created_from = p.st.pod.spec_hash if p.st.pod else None
    if created_from is None or created_from == pods.spec_hash(p.spec):
        return False
    message = f"spec changed: restarting {pod.name} from its checkpoint with the new resources and settings"
    p.stop_pod(pod.name, "SpecChanged")
    p.event("Normal", "SpecChanged", message)
    p.set_condition(cond.PROGRESSING, True, "Restarting", message)
    p.st.message = message
    return True


def placed(p: Pass, pod: PodView | None) -> None:
    node = pod.node_name if pod is not None else None
    if p.st.waiting_for_capacity_since is not None or cond.get(p.st.conditions, cond.WAITING_FOR_CAPACITY):
        p.st.waiting_for_capacity_since = None
        p.set_condition(cond.WAITING_FOR_CAPACITY, False, "Scheduled", f"placed on {node}")
    if node:
        p.set_condition(cond.POD_SCHEDULED, True, "Scheduled", f"placed on {node}")


def admitted(p: Pass) -> None:
    """The pod's scheduling gates are gone (Kueue admitted its Workload), or it ended."""
    if cond.is_true(p.st.conditions, cond.QUEUED):
        p.set_condition(cond.QUEUED, False, "Admitted", "the pod's scheduling gates were removed")


def queued(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    """Held by scheduling gates (Kueue's ``kueue.x-k8s.io/admission`` until its Workload is
    admitted): Pending, not billed (no node), no idle clock (only a running pod has one), and
    not ``WaitingForCapacity`` (the queue, not the cluster, holds it: no capacity fallback)."""
    st = p.st
    st.phase = Phase.pending
    st.waiting_for_capacity_since = None
    msg = f"queued: {outcome.message}"
    if not cond.is_true(st.conditions, cond.QUEUED):
        p.event("Normal", "Queued", f"pod {p.current_name} {outcome.message}")
    p.set_condition(cond.QUEUED, True, outcome.reason, outcome.message)
    p.set_condition(cond.POD_SCHEDULED, False, outcome.reason, outcome.message)
    p.set_condition(cond.READY, False, "Queued", msg)
    st.message = msg
    return p.finish()


def unscheduled(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    st = p.st
    st.phase = Phase.pending
    st.waiting_for_capacity_since = st.waiting_for_capacity_since or p.now
    msg = f"waiting for {st.capacity} capacity: {outcome.message}"
    if not cond.is_true(st.conditions, cond.WAITING_FOR_CAPACITY):
        p.event("Normal", "WaitingForCapacity", outcome.message)
    p.set_condition(cond.WAITING_FOR_CAPACITY, True, outcome.reason, msg)
    p.set_condition(cond.POD_SCHEDULED, False, outcome.reason, outcome.message)
    p.set_condition(cond.READY, False, "WaitingForCapacity", msg)
    st.message = msg
    return p.finish()


def starting(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    p.st.phase, p.st.message = Phase.pending, outcome.message
    p.set_condition(cond.READY, False, outcome.reason, outcome.message)
    return p.finish()


def config_error(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    v = retry.on_config_error(outcome)
    p.apply(v)
    assert v.stop is not None
    return stopping.stop(p, v.stop)


def still_running(p: Pass, pod: PodView) -> bool:
    """A pod we stopped whose trainer is still writing its SIGTERM checkpoint (within its grace
    period plus a little patience): the next pod must wait for that checkpoint."""
    if pod.phase != "Running" or pod.container.finished is not None or p.node_missing(pod):
        return False
    return pod.deletion is None or (p.now - pod.deletion).total_seconds() <= TERMINATING_PATIENCE_SECONDS


def superseded(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    """Our own stop of the current pod (a spec change, a suspend undone): once it has ended —
    its SIGTERM checkpoint written — the next incarnation starts from that checkpoint."""
    if pod is not None and still_running(p, pod):
        p.st.message = f"waiting for {pod.name} to write its checkpoint and exit"
        return p.finish_at(stopping.FINISHING_POLL_SECONDS)
    p.st.incarnation += 1
    return p.finish_at(stopping.FINISHING_POLL_SECONDS)


# ----------------------------------------------------------------------------- running


def running(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    st, name = p.st, p.current_name
    assert p.spec is not None and st.cost is not None
    if st.phase is not Phase.running:
        p.event("Normal", "Running", f"trainer {name} running on {pod.node_name if pod else None}")
    st.phase, st.message = Phase.running, outcome.message
    st.start_time = st.start_time or outcome.started or p.now
    p.set_condition(cond.READY, True, "Running", outcome.message)
    if outcome.termination_notice:
        termination_notice(p, pod)
    remaining = cost.remaining_seconds(st.progress, p.spec)
    st.eta = cost.eta(remaining, st.cost.hourly_rate_usd, p.now)
    for check in (idle_check, plateau_check, gates_check):
        done = check(p)
        if done is not None:
            return done
    progressing = st.progress is not None and st.progress.step > 0
    p.set_condition(
        cond.PROGRESSING,
        True,
        "Training" if progressing else "Starting",
        f"step {st.progress.step}/{st.progress.total_steps}"
        if st.progress
        else "waiting for the first report",
    )
    return p.finish()


def termination_notice(p: Pass, pod: PodView | None) -> None:
    """The node is going away: ask the trainer for a checkpoint now (once per pod)."""
    rid = f"{p.current_name}-termination-notice"
    ctl = p.st.control or TrainerControl()
    if ctl.checkpoint_request is not None and ctl.checkpoint_request.id == rid:
        return
    request = CheckpointRequest(id=rid, reason="interruption", time=p.now, stop=False)
    p.st.control = TrainerControl(
        checkpoint_request=request, stop_report=ctl.stop_report, evaluation_request=ctl.evaluation_request
    )
    node = pod.node_name if pod else None
    p.event("Warning", "TerminationNotice", f"node {node} is going away: asked the trainer for a checkpoint")


def idle_check(p: Pass) -> Plan | None:
    assert p.spec is not None
    st = p.st
    started = st.pod.started if st.pod and st.pod.started else st.start_time or p.now
    v, st.idle_tracking = idle.evaluate(
        p.spec.idle, st.progress, st.idle_tracking, p.current_name, started, p.now
    )
    p.apply(v)
    return stopping.stop(p, v.stop) if v.stop is not None else None


def _metrics(p: Pass) -> gates.Metrics:
    assert p.st.cost is not None
    return gates.Metrics.of(p.st.progress, p.st.cost.accrued_usd)


def plateau_check(p: Pass) -> Plan | None:
    assert p.spec is not None
    rule = p.spec.plateau
    p.st.evaluations = plateau.track(p.st.evaluations, p.st.progress, rule.min_improvement if rule else 0.0)
    v = plateau.evaluate(rule, p.st.evaluations, p.spec.gates, _metrics(p), p.now)
    p.apply(v)
    if v.stop is None:
        return None
    return stopping.stop(p, v.stop, gate=gates.final(p.spec.gates, _metrics(p), p.now))


def gates_check(p: Pass) -> Plan | None:
    assert p.spec is not None
    st = p.st
    ctl = st.control or TrainerControl()
    result = gates.evaluate(
        p.spec.gates,
        {g.name for g in st.gates},
        st.pending_gates,
        _metrics(p),
        st.start_time,
        p.now,
        ctl.evaluation_request,
    )
    p.apply(result.verdict)
    st.pending_gates = result.pending
    st.control = TrainerControl(
        checkpoint_request=ctl.checkpoint_request,
        stop_report=ctl.stop_report,
        evaluation_request=result.request,
    )
    for outcome in result.judged:
        st.gates = [*st.gates, outcome]
        st.decision = outcome.decision
        st.decision_reason = f"gate {outcome.name}: {outcome.reason}"
    stop = result.verdict.stop
    return stopping.stop(p, stop) if stop is not None else None


# ----------------------------------------------------------------------------- ended


def completed(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    assert p.spec is not None
    st = p.st
    result = gates.final(p.spec.gates, _metrics(p), p.now)
    st.gates = [g for g in st.gates if g.name != gates.FINAL_GATE] + [result]
    st.decision, st.decision_reason = result.decision, f"final: {result.reason}"
    st.phase, st.message = Phase.succeeded, "training completed"
    st.completion_time = outcome.finished or p.now
    st.eta = None
    st.pending_gates = []
    p.set_condition(cond.COMPLETE, True, "Completed", st.decision_reason)
    p.set_condition(cond.READY, True, "Completed", st.decision_reason)
    p.set_condition(cond.PROGRESSING, False, "Completed", "training completed")
    p.event("Normal", "Completed", f"training completed; decision {result.decision.value}")
    return p.finish_at(None)


def _finished_training(p: Pass, outcome: Outcome) -> bool:
    """It finished training just as it was being taken away: that is a success."""
    prog = p.st.progress
    return (
        outcome.exit_code == 0
        and prog is not None
        and prog.pod_name == p.current_name
        and prog.state is TrainerState.completed
    )


def lost(p: Pass, pod: PodView | None, outcome: Outcome) -> Plan:
    """Interrupted or failed: count it once, with the incarnation bump in the same write."""
    assert p.spec is not None
    st = p.st
    if outcome.kind is Kind.interrupted and _finished_training(p, outcome):
        return completed(p, pod, outcome)
    if outcome.kind is Kind.interrupted:
        st.interruptions += 1
        st.last_interruption = f"{outcome.reason}: {outcome.message}"
        v, delay = spot.on_interruption(p.spec, st.interruptions, p.current_name, outcome)
    else:
        st.failures += 1
        v, delay = retry.on_failure(p.spec, st.failures, outcome)
    p.apply(v)
    if v.stop is not None:
        return stopping.stop(p, v.stop)
    st.incarnation += 1
    st.retry_after = p.now + timedelta(seconds=delay)
    st.phase = Phase.pending
    st.eta = None
    st.message = f"waiting {delay:.0f}s before pod {pod_name(p.name, st.incarnation)}"
    p.set_condition(cond.READY, False, outcome.reason, outcome.message)
    return p.finish_at(max(0.5, delay))


HANDLERS: dict[Kind, Callable[[Pass, PodView | None, Outcome], Plan]] = {
    Kind.queued: queued,
    Kind.unscheduled: unscheduled,
    Kind.starting: starting,
    Kind.running: running,
    Kind.succeeded: completed,
    Kind.stopped: superseded,
    Kind.config_error: config_error,
    Kind.interrupted: lost,
    Kind.failed: lost,
}
