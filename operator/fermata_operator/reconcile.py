"""The reconcile planner: from what is observed to what should be done. No I/O here.

:func:`plan` takes one TrainingRun, its pods and their nodes, and returns a :class:`Plan`: the
operator-owned status to write, the objects to create, the pods to stop, the finalizers to
release and the Events to post. :mod:`fermata_operator.controller` carries plans out.

Level-triggered and restart-safe: everything the planner needs to remember lives in the run's
status (incarnation, counters, closed cost spans, idle clocks, the stop being carried out);
pods are named ``<run>-<incarnation>``, so a repeated create is a harmless conflict; the
incarnation and the interruption/failure counters move in the same status write, so a pod's
end is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from fermata_operator import budget as budget_policy
from fermata_operator import conditions as cond
from fermata_operator import cost as cost_policy
from fermata_operator import gates as gate_policy
from fermata_operator import idle as idle_policy
from fermata_operator import podspec, spot
from fermata_operator.api import (
    TERMINAL_PHASES,
    AbortReport,
    Decision,
    NoGoAction,
    Phase,
    PodStatusSummary,
    StopIntent,
    TrainingRunSpec,
    TrainingRunStatus,
)
from fermata_operator.pod_outcome import TERMINATING_PATIENCE_SECONDS, Kind, Outcome, classify
from fermata_operator.settings import (
    ANNOTATION_CAPACITY,
    CAPACITY_LABELS,
    INSTANCE_TYPE_LABEL,
    LABEL_INCARNATION,
    POD_FINALIZER,
    OperatorSettings,
)
from fermata_trainer.contract import (
    CheckpointRequest,
    StopReport,
    TrainerControl,
    TrainerProgress,
    TrainerState,
    report_key,
)

#: Status keys the trainer owns; the operator never writes them.
TRAINER_KEYS = {"progress", "lastCheckpoint"}


@dataclass
class Observed:
    run: dict[str, Any]
    pods: list[dict[str, Any]]
    #: Nodes by name (only those the pods run on need to be present).
    nodes: dict[str, dict[str, Any]]
    #: Node names confirmed gone (404), not merely absent from a cache.
    missing_nodes: set[str]
    prices: cost_policy.PriceTable
    now: datetime


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    #: (pod name, stop reason)
    stop_pods: list[tuple[str, str]] = field(default_factory=list)
    release_finalizers: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


# ----------------------------------------------------------------------------- helpers


def _ts(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def read_status(run: dict[str, Any]) -> TrainingRunStatus:
    """The run's status, tolerant of fields this operator version does not know."""
    raw = dict(run.get("status") or {})
    try:
        return TrainingRunStatus.model_validate(raw)
    except ValidationError:
        # Keep what parses: drop the offending top-level keys one by one.
        for key in list(raw):
            try:
                TrainingRunStatus.model_validate({key: raw[key]})
            except ValidationError:
                raw.pop(key)
        return TrainingRunStatus.model_validate(raw)


def operator_status(status: TrainingRunStatus) -> dict[str, Any]:
    """The operator-owned part of the status, as JSON."""
    data = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key in TRAINER_KEYS:
        data.pop(key, None)
    return data


def incarnation_of(pod: dict[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_INCARNATION, "-1"))
    except ValueError:
        return -1


def node_capacity_type(node: dict[str, Any] | None) -> str | None:
    if node is None:
        return None
    node_labels = (node.get("metadata") or {}).get("labels") or {}
    for key, values in CAPACITY_LABELS.items():
        if key in node_labels:
            for capacity, label_value in values.items():
                if node_labels[key] == label_value:
                    return capacity
    return None


def node_instance_type(node: dict[str, Any] | None) -> str | None:
    if node is None:
        return None
    return ((node.get("metadata") or {}).get("labels") or {}).get(INSTANCE_TYPE_LABEL)


def pod_ended_at(pod: dict[str, Any], outcome: Outcome, node_missing: bool, now: datetime) -> datetime | None:
    """When billing of this pod stopped (None while it still runs)."""
    if outcome.finished is not None:
        return outcome.finished
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    deleting = _ts(meta.get("deletionTimestamp"))
    if phase in {"Succeeded", "Failed"}:
        return _ts(((pod.get("status") or {}).get("conditions") or [{}])[-1].get("lastTransitionTime")) or now
    if deleting is not None and (
        node_missing
        or not (pod.get("spec") or {}).get("nodeName")
        or (now - deleting).total_seconds() > TERMINATING_PATIENCE_SECONDS
    ):
        return min(now, deleting)
    return None


def remaining_seconds(progress: TrainerProgress | None, spec: TrainingRunSpec) -> float | None:
    """Seconds of training left at the reported throughput (None if unknown)."""
    if progress is None or not progress.samples_per_second or not progress.total_steps:
        return None
    per_step = spec.training.batch_size * spec.training.gradient_accumulation
    steps_left = max(0, progress.total_steps - progress.step)
    return steps_left * per_step / progress.samples_per_second


# ----------------------------------------------------------------------------- the planner


def plan(obs: Observed, settings: OperatorSettings) -> Plan:
    run = obs.run
    meta = run["metadata"]
    name = meta["name"]
    generation = meta.get("generation")
    now = obs.now
    old = read_status(run)
    st = old.model_copy(deep=True)
    events: list[Event] = []
    p = Plan(status={})

    def set_cond(ctype: str, value: bool, reason: str, message: str) -> None:
        st.conditions = cond.put(st.conditions, ctype, value, reason, message, now, generation)

    def finish(result: Plan) -> Plan:
        st.observed_generation = generation
        if st.progress is not None and st.progress.total_steps:
            st.progress_percent = round(100.0 * st.progress.step / st.progress.total_steps, 1)
        result.status = operator_status(st)
        result.events = events
        return result

    # --- the spec -------------------------------------------------------------------------
    try:
        spec = TrainingRunSpec.model_validate(run.get("spec") or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"spec.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        if not cond.get(st.conditions, cond.ACCEPTED) or cond.is_true(st.conditions, cond.ACCEPTED):
            events.append(Event("Warning", "InvalidSpec", problems))
        set_cond(cond.ACCEPTED, False, "InvalidSpec", problems)
        st.phase = st.phase or Phase.pending
        st.message = f"invalid spec: {problems}"
        return finish(p)  # no requeue: a spec change wakes us
    set_cond(cond.ACCEPTED, True, "Valid", "spec accepted")

    # --- pods and their meaning ------------------------------------------------------------
    pods = sorted(obs.pods, key=incarnation_of)
    outcomes: dict[str, Outcome] = {}
    billing: list[cost_policy.PodBilling] = []
    for pod in pods:
        pname = pod["metadata"]["name"]
        node_name = (pod.get("spec") or {}).get("nodeName")
        node = obs.nodes.get(node_name) if node_name else None
        node_missing = bool(node_name) and node_name in obs.missing_nodes
        pod_outcome = classify(pod, node, node_missing, now)
        outcomes[pname] = pod_outcome
        summary = st.pod if st.pod is not None and st.pod.name == pname else None
        start = _ts((pod.get("status") or {}).get("startTime")) or pod_outcome.started
        if not node_name:
            start = None
        billing.append(
            cost_policy.PodBilling(
                pod=pname,
                node=node_name,
                instance_type=node_instance_type(node) or (summary.instance_type if summary else None),
                capacity_type=node_capacity_type(node)
                or (summary.capacity_type if summary else None)
                or (pod["metadata"].get("annotations") or {}).get(ANNOTATION_CAPACITY),
                start=start,
                end=pod_ended_at(pod, pod_outcome, node_missing, now),
            )
        )

    # --- cost ----------------------------------------------------------------------------
    costs = cost_policy.compute(
        st.cost,
        billing,
        obs.prices,
        spec.budget.prices,
        spec.budget.max_usd,
        now,
        remaining_seconds(st.progress, spec),
    )
    st.cost = costs.status
    if costs.unpriced:
        set_cond(
            cond.ACCEPTED,
            True,
            "UnknownPrice",
            "no price for " + ", ".join(costs.unpriced) + ": add it to the price table or "
            "spec.budget.prices (counted as $0 meanwhile)",
        )
    # A pod's finalizer goes once its billed span is closed in the status written with it.
    for pod, bill in zip(pods, billing, strict=True):
        pname = pod["metadata"]["name"]
        gone = pod["metadata"].get("deletionTimestamp") is not None or outcomes[pname].ended
        closed = pname in costs.closed_pods or bill.start is None
        if POD_FINALIZER in (pod["metadata"].get("finalizers") or []) and gone and closed:
            p.release_finalizers.append(pname)

    current_name = podspec.pod_name(name, st.incarnation)
    current = next((pd for pd in pods if pd["metadata"]["name"] == current_name), None)
    outcome: Outcome | None = outcomes.get(current_name)
    requeue: list[float] = [settings.resync_seconds]

    def active(pod: dict[str, Any]) -> bool:
        o = outcomes[pod["metadata"]["name"]]
        return not o.ended and pod["metadata"].get("deletionTimestamp") is None

    # Stray pods of earlier incarnations must not run beside the current one.
    for pod in pods:
        if pod is not current and active(pod):
            p.stop_pods.append((pod["metadata"]["name"], "superseded"))

    def trainer_alive(pod_name: str) -> bool:
        """The trainer in this pod reported recently (so it will see a request in status)."""
        prog = st.progress
        if prog is None or prog.pod_name != pod_name or prog.state is TrainerState.stopped:
            return False
        return (now - prog.heartbeat_time).total_seconds() <= 3 * settings.trainer_heartbeat_seconds

    def let_trainer_finish(pod_name: str) -> bool:
        """Stopping: the trainer was asked to checkpoint and exit on its own; give it until it
        acknowledges or ``checkpoint_request_timeout_seconds`` pass, then SIGTERM it."""
        req = st.control.checkpoint_request if st.control else None
        if req is None or not req.stop or not req.id.startswith(pod_name + "-stop"):
            return False
        acked = st.progress is not None and st.progress.checkpoint_request_ack == req.id
        waited = (now - req.time).total_seconds()
        # Acknowledged: the checkpoint is written and the trainer is on its way out (abort report,
        # last status); not yet: it is alive and should see the request at its next heartbeat.
        return waited < settings.checkpoint_request_timeout_seconds and (acked or trainer_alive(pod_name))

    # --- terminal: make sure nothing runs ------------------------------------------------
    if st.phase in TERMINAL_PHASES:
        waiting = False
        for pod in pods:
            if active(pod):
                if let_trainer_finish(pod["metadata"]["name"]):
                    waiting = True
                    continue
                p.stop_pods.append((pod["metadata"]["name"], st.phase.value if st.phase else "stopped"))
        if waiting:
            p.requeue_after = 1.0
        elif any(active(pd) for pd in pods) or p.release_finalizers:
            p.requeue_after = 5.0
        if st.completion_time is None and not any(active(pd) for pd in pods):
            st.completion_time = now
        return finish(p)

    # --- a stop in progress --------------------------------------------------------------
    def stop(phase: Phase, reason: str, message: str, decision: Decision | None) -> Plan:
        st.stop = StopIntent(phase=phase, reason=reason, message=message, time=now)
        # The abort report: its summary in status, the JSON written by the trainer as it stops.
        report = StopReport(
            id=f"{reason.lower()}-{now.strftime('%Y%m%dT%H%M%SZ')}",
            phase=phase.value,
            reason=reason,
            decision=decision.value if decision else None,
            message=message,
            time=now,
            step=st.progress.step if st.progress else None,
            cost_usd=st.cost.accrued_usd if st.cost else None,
            evidence=dict(st.gates[-1].evidence) if st.gates else {},
        )
        ctl = st.control or TrainerControl()
        st.control = TrainerControl(checkpoint_request=ctl.checkpoint_request, stop_report=report)
        base = spec.storage.checkpoints.rstrip("/")
        st.abort_report = AbortReport(
            uri=f"{base}/{report_key(report.id)}", reason=reason, summary=message, time=now
        )
        st.phase = phase
        st.message = message
        if decision is not None:
            st.decision = decision
            st.decision_reason = message
        st.retry_after = None
        for pod in pods:
            if not active(pod):
                continue
            pname = pod["metadata"]["name"]
            if pod is current and trainer_alive(pname):
                # Tell the trainer to checkpoint, write the abort report and exit by itself;
                # the pod is SIGTERMed only if it does not within the timeout.
                st.control = TrainerControl(
                    checkpoint_request=CheckpointRequest(
                        id=f"{pname}-stop-{reason.lower()}", reason=reason, time=now, stop=True
                    ),
                    stop_report=report,
                )
            else:
                p.stop_pods.append((pname, reason))
        if not any(active(pd) for pd in pods):
            st.completion_time = now
        set_cond(cond.READY, False, reason, message)
        set_cond(cond.PROGRESSING, False, reason, message)
        if not any(e.reason == reason for e in events):  # a NO-GO gate already said it
            events.append(Event("Warning" if decision is Decision.no_go else "Normal", reason, message))
        p.requeue_after = 5.0
        return finish(p)

    # --- deadline --------------------------------------------------------------------------
    if spec.deadline and st.start_time is not None:
        from fermata_trainer.contract import parse_duration

        left = parse_duration(spec.deadline) - (now - st.start_time).total_seconds()
        if left <= 0:
            return stop(
                Phase.stopped,
                "DeadlineExceeded",
                f"deadline {spec.deadline} reached",
                Decision.no_go,
            )
        requeue.append(left)

    # --- budget ----------------------------------------------------------------------------
    verdict = budget_policy.evaluate(st.cost, spec.budget)
    if verdict.exceeded:
        set_cond(cond.BUDGET_EXCEEDED, True, "BudgetExceeded", verdict.message)
        return stop(Phase.budget_exceeded, "BudgetExceeded", verdict.message, Decision.no_go)
    if verdict.projected_overrun:
        set_cond(cond.BUDGET_EXCEEDED, True, "ProjectedOverrun", verdict.message)
        return stop(Phase.budget_exceeded, "ProjectedOverrun", verdict.message, Decision.no_go)
    if verdict.warn:
        if not cond.is_true(st.conditions, cond.BUDGET_WARNING):
            events.append(Event("Warning", "BudgetWarning", verdict.message))
        set_cond(cond.BUDGET_WARNING, True, "BudgetWarning", verdict.message)
    else:
        set_cond(cond.BUDGET_WARNING, False, "WithinBudget", verdict.message)
    set_cond(cond.BUDGET_EXCEEDED, False, "WithinBudget", verdict.message)
    if verdict.seconds_to_budget is not None:
        requeue.append(max(1.0, verdict.seconds_to_budget))

    # --- suspend -----------------------------------------------------------------------------
    if spec.suspend:
        for pod in pods:
            if active(pod):
                p.stop_pods.append((pod["metadata"]["name"], "Suspended"))
        if st.phase is not Phase.suspended:
            events.append(Event("Normal", "Suspended", "checkpointing and releasing the GPU"))
        st.phase = Phase.suspended
        st.message = "suspended: set spec.suspend=false to resume from the last checkpoint"
        set_cond(cond.SUSPENDED, True, "Suspended", st.message)
        set_cond(cond.READY, False, "Suspended", st.message)
        st.waiting_for_capacity_since = None
        if current is not None and outcome is not None and outcome.ended:
            # The suspended pod is done: the next one (after resume) is a new incarnation.
            st.incarnation += 1
        p.requeue_after = 5.0 if any(active(pd) for pd in pods) else None
        return finish(p)
    if st.phase is Phase.suspended:
        events.append(Event("Normal", "Resumed", "resuming from the last checkpoint"))
        set_cond(cond.SUSPENDED, False, "Resumed", "resumed")
        st.phase = Phase.pending
        if current is not None:
            st.incarnation += 1
            current, outcome = None, None
            current_name = podspec.pod_name(name, st.incarnation)

    # --- the current pod -------------------------------------------------------------------
    if current is None and st.pod is not None and st.pod.name == current_name and st.pod.node_name:
        # We created it and it was placed, but it is gone without us seeing its end.
        outcome = Outcome(Kind.interrupted, "PodVanished", f"pod {current_name} disappeared", None, True)

    if current is None and outcome is None:
        if st.retry_after is not None and st.retry_after > now:
            st.phase = st.phase or Phase.pending
            requeue.append((st.retry_after - now).total_seconds())
            p.requeue_after = min(requeue)
            return finish(p)
        capacity, why = spot.capacity_for(
            spec, st.interruptions, st.start_time, now, remaining_seconds(st.progress, spec)
        )
        if st.capacity is not None and st.capacity != capacity.value:
            events.append(Event("Normal", "CapacityChanged", f"next pod on {capacity.value}: {why}"))
        resume = st.last_checkpoint.uri if st.last_checkpoint is not None else None
        p.create.append(podspec.config_map(run, spec, settings))
        p.create.extend(podspec.trainer_rbac(run))
        p.create.append(
            podspec.trainer_pod(
                run,
                spec,
                settings,
                incarnation=st.incarnation,
                capacity=capacity,
                resume_from=resume,
            )
        )
        st.pod = PodStatusSummary(name=current_name, incarnation=st.incarnation, phase="Pending", created=now)
        st.capacity = capacity.value
        st.retry_after = None
        st.phase = Phase.pending if st.phase in (None, Phase.pending) else st.phase
        if st.phase is Phase.running:
            st.phase = Phase.pending
        st.message = f"created pod {current_name} on {capacity.value} capacity" + (
            f", resuming from step {st.last_checkpoint.step}" if st.last_checkpoint else ""
        )
        events.append(Event("Normal", "PodCreated", st.message))
        p.requeue_after = min(requeue)
        return finish(p)

    assert outcome is not None
    node_name = ((current or {}).get("spec") or {}).get("nodeName")
    node = obs.nodes.get(node_name) if node_name else None
    if current is not None:
        st.pod = PodStatusSummary(
            name=current_name,
            incarnation=st.incarnation,
            phase=(current.get("status") or {}).get("phase"),
            node_name=node_name,
            instance_type=node_instance_type(node) or (st.pod.instance_type if st.pod else None),
            capacity_type=node_capacity_type(node) or (st.pod.capacity_type if st.pod else None),
            created=_ts(current["metadata"].get("creationTimestamp")),
            started=outcome.started or (st.pod.started if st.pod else None),
        )

    if outcome.kind is Kind.unscheduled:
        st.phase = Phase.pending
        st.waiting_for_capacity_since = st.waiting_for_capacity_since or now
        msg = f"waiting for {st.capacity} capacity: {outcome.message}"
        if not cond.is_true(st.conditions, cond.WAITING_FOR_CAPACITY):
            events.append(Event("Normal", "WaitingForCapacity", outcome.message))
        set_cond(cond.WAITING_FOR_CAPACITY, True, outcome.reason, msg)
        set_cond(cond.POD_SCHEDULED, False, outcome.reason, outcome.message)
        set_cond(cond.READY, False, "WaitingForCapacity", msg)
        st.message = msg
        p.requeue_after = min(requeue)
        return finish(p)

    if st.waiting_for_capacity_since is not None or cond.get(st.conditions, cond.WAITING_FOR_CAPACITY):
        st.waiting_for_capacity_since = None
        set_cond(cond.WAITING_FOR_CAPACITY, False, "Scheduled", f"placed on {node_name}")
    if node_name:
        set_cond(cond.POD_SCHEDULED, True, "Scheduled", f"placed on {node_name}")

    if outcome.kind is Kind.config_error:
        set_cond(cond.FAILED, True, outcome.reason, outcome.message)
        st.decision = Decision.no_go
        st.decision_reason = outcome.message
        return stop(Phase.failed, outcome.reason, outcome.message, Decision.no_go)

    if outcome.kind is Kind.starting:
        st.phase = Phase.pending
        st.message = outcome.message
        set_cond(cond.READY, False, outcome.reason, outcome.message)
        p.requeue_after = min(requeue)
        return finish(p)

    if outcome.kind is Kind.running:
        if st.phase is not Phase.running:
            events.append(Event("Normal", "Running", f"trainer {current_name} running on {node_name}"))
        st.phase = Phase.running
        st.start_time = st.start_time or outcome.started or now
        st.message = outcome.message
        set_cond(cond.READY, True, "Running", outcome.message)
        if outcome.termination_notice:
            req_id = f"{current_name}-termination-notice"
            ctl = st.control or TrainerControl()
            if ctl.checkpoint_request is None or ctl.checkpoint_request.id != req_id:
                st.control = TrainerControl(
                    checkpoint_request=CheckpointRequest(
                        id=req_id, reason="interruption", time=now, stop=False
                    )
                )
                events.append(
                    Event(
                        "Warning",
                        "TerminationNotice",
                        f"node {node_name} is going away: asked the trainer for a checkpoint",
                    )
                )
        started = st.pod.started if st.pod and st.pod.started else st.start_time
        # Idle
        iv = idle_policy.evaluate(spec.idle, st.progress, st.idle_tracking, current_name, started, now)
        st.idle_tracking = iv.tracking
        if iv.idle:
            set_cond(cond.IDLE, True, iv.reason, iv.message)
            return stop(Phase.idle_stopped, "Idle", iv.message, Decision.no_go)
        set_cond(cond.IDLE, False, iv.reason, iv.message)
        if iv.wake_in is not None:
            requeue.append(max(1.0, iv.wake_in))
        progressing = st.progress is not None and st.progress.step > 0
        set_cond(
            cond.PROGRESSING,
            True,
            "Training" if progressing else "Starting",
            f"step {st.progress.step}/{st.progress.total_steps}"
            if st.progress
            else "waiting for the first report",
        )
        # Gates
        metrics = gate_policy.Metrics.of(st.progress, st.cost.accrued_usd)
        fired = {g.name for g in st.gates}
        for gate in spec.gates:
            if gate.name in fired:
                continue
            if gate_policy.due(gate, st.start_time, metrics, now):
                result = gate_policy.evaluate(gate.name, gate.require, gate.margin, metrics, now)
                st.gates = [*st.gates, result]
                st.decision = result.decision
                st.decision_reason = f"gate {gate.name}: {result.reason}"
                set_cond(
                    cond.GATE_PASSED,
                    result.decision is not Decision.no_go,
                    result.decision.value.title().replace("-", ""),
                    st.decision_reason,
                )
                events.append(
                    Event(
                        "Warning" if result.decision is Decision.no_go else "Normal",
                        "Gate" + result.decision.value.title().replace("-", ""),
                        st.decision_reason,
                    )
                )
                if result.decision is Decision.no_go and gate.on_no_go is NoGoAction.stop:
                    return stop(Phase.stopped, "GateNoGo", st.decision_reason, Decision.no_go)
            else:
                wait = gate_policy.seconds_until_due(gate, st.start_time, now)
                if wait is not None:
                    requeue.append(max(1.0, wait))
        p.requeue_after = min(requeue)
        return finish(p)

    if (
        outcome.kind is Kind.interrupted
        and outcome.exit_code == 0
        and st.progress is not None
        and st.progress.pod_name == current_name
        and st.progress.state is TrainerState.completed
    ):
        # It finished training just as it was being taken away: that is a success.
        outcome = Outcome(
            Kind.succeeded, "Completed", "trainer completed", 0, False, outcome.started, outcome.finished
        )

    if outcome.kind is Kind.succeeded:
        metrics = gate_policy.Metrics.of(st.progress, st.cost.accrued_usd)
        result = gate_policy.final(spec.gates, metrics, now)
        st.gates = [g for g in st.gates if g.name != gate_policy.FINAL_GATE] + [result]
        st.decision = result.decision
        st.decision_reason = f"final: {result.reason}"
        st.phase = Phase.succeeded
        st.completion_time = outcome.finished or now
        st.message = "training completed"
        set_cond(cond.COMPLETE, True, "Completed", st.decision_reason)
        set_cond(cond.READY, True, "Completed", st.decision_reason)
        set_cond(cond.PROGRESSING, False, "Completed", "training completed")
        events.append(Event("Normal", "Completed", f"training completed; decision {result.decision.value}"))
        return finish(p)

    if outcome.kind is Kind.stopped:
        # Our own stop of the current pod without a recorded intent (e.g. superseded): move on.
        st.incarnation += 1
        p.requeue_after = 1.0
        return finish(p)

    # Interrupted or failed: count it once, with the incarnation bump in the same write.
    if outcome.kind is Kind.interrupted:
        st.interruptions += 1
        st.last_interruption = f"{outcome.reason}: {outcome.message}"
        set_cond(cond.INTERRUPTED, True, outcome.reason, outcome.message)
        if st.interruptions > spec.spot.max_interruptions:
            msg = f"{st.interruptions} spot interruptions exceed spot.maxInterruptions={spec.spot.max_interruptions}"
            set_cond(cond.FAILED, True, "TooManyInterruptions", msg)
            return stop(Phase.failed, "TooManyInterruptions", msg, Decision.no_go)
        delay = spot.backoff_seconds(
            st.interruptions, spec.spot.backoff_seconds, spec.spot.max_backoff_seconds
        )
        events.append(
            Event(
                "Warning",
                "Interrupted",
                f"pod {current_name} lost ({outcome.reason}); interruption {st.interruptions}/"
                f"{spec.spot.max_interruptions}, new pod in {delay:.0f}s from the last checkpoint",
            )
        )
    else:
        st.failures += 1
        set_cond(cond.INTERRUPTED, False, "Failure", outcome.message)
        if st.failures > spec.failures.max_retries:
            set_cond(cond.FAILED, True, outcome.reason, outcome.message)
            return stop(Phase.failed, "TrainerFailed", outcome.message, Decision.no_go)
        delay = spot.backoff_seconds(st.failures, spec.failures.backoff_seconds, 3600)
        events.append(
            Event(
                "Warning",
                "TrainerFailed",
                f"{outcome.message}; retry {st.failures}/{spec.failures.max_retries} in {delay:.0f}s",
            )
        )
    st.incarnation += 1
    st.retry_after = now + timedelta(seconds=delay)
    st.phase = Phase.pending
    st.message = f"waiting {delay:.0f}s before pod {podspec.pod_name(name, st.incarnation)}"
    set_cond(cond.READY, False, outcome.reason, outcome.message)
    p.requeue_after = max(0.5, delay)
    return finish(p)


def status_changed(old: dict[str, Any], new: dict[str, Any], min_cost_interval: float, now: datetime) -> bool:
    """Whether the operator-owned status differs enough to be written now.

    Anything but running totals (cost figures, condition messages) is written at once; running
    totals at most every ``min_cost_interval`` seconds, which bounds steady-state API traffic.
    """

    def stable(d: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in d.items() if k not in TRAINER_KEYS and k != "message"}
        cost = dict(out.get("cost") or {})
        for k in ("updated", "accruedUSD", "remainingUSD", "projectedTotalUSD"):
            cost.pop(k, None)
        cost["segments"] = [
            {k: v for k, v in s.items() if k != "usd"} for s in cost.get("segments") or [] if s.get("end")
        ]
        out["cost"] = cost
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "message"} for c in out.get("conditions") or []
        ]
        out.pop("progressPercent", None)
        return out

    if stable(old) != stable(new):
        return True
    if old == new:
        return False
    updated = _ts((old.get("cost") or {}).get("updated"))
    return updated is None or (now - updated).total_seconds() >= min_cost_interval
