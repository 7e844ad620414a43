"""The working state of one planning pass: the status being built and what to do.

:class:`Pass` holds the run's spec and a working copy of its status, the typed pods and nodes,
each pod's outcome, and the plan being assembled; policies' verdicts are applied to it with
:meth:`Pass.apply`. Nothing here decides anything: the decisions are in ``policies/`` and the
lifecycle in :mod:`fermata_operator.planner.lifecycle`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from fermata_api import TrainerState, TrainingRunSpec, TrainingRunStatus
from fermata_api import conditions as cond
from fermata_operator.planner.model import TRAINER_KEYS, Observed, Plan
from fermata_operator.policies.effects import Event, Verdict
from fermata_operator.policies.pod_outcome import Outcome, classify
from fermata_operator.settings import OperatorSettings
from fermata_operator.views import NodeView, PodView


def read_status(run: dict[str, Any]) -> TrainingRunStatus:
    """The run's status, tolerant of fields this operator version does not know or cannot parse."""
    raw = dict(run.get("status") or {})
    try:
        return TrainingRunStatus.model_validate(raw)
    except ValidationError:
        for key in list(raw):  # keep what parses: drop the offending top-level keys
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


def pod_name(run_name: str, incarnation: int) -> str:
    return f"{run_name}-{incarnation}"


def prep_pod_name(run_name: str, incarnation: int) -> str:
    return f"{run_name}-prep-{incarnation}"


@dataclass
class Pass:
    name: str
    generation: int | None
    now: datetime
    settings: OperatorSettings
    obs: Observed
    st: TrainingRunStatus
    spec: TrainingRunSpec | None = None
    pods: list[PodView] = field(default_factory=list)
    nodes: dict[str, NodeView] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    plan: Plan = field(default_factory=lambda: Plan(status={}))
    requeue: list[float] = field(default_factory=list)
    #: The Accepted condition this pass ends with (status, reason, message): set once, at the end,
    #: so that a later finding (an unknown price) does not make it flap within a pass.
    accepted: tuple[bool, str, str] = (True, "Valid", "spec accepted")

    @classmethod
    def start(cls, obs: Observed, settings: OperatorSettings) -> Pass:
        meta = obs.run["metadata"]
        p = cls(
            name=meta["name"],
            generation=meta.get("generation"),
            now=obs.now,
            settings=settings,
            obs=obs,
            st=read_status(obs.run).model_copy(deep=True),
            requeue=[settings.resync_seconds],
        )
        p.nodes = {n: NodeView.of(body) for n, body in obs.nodes.items()}
        # Only pods this run controls (owner reference to its UID) are billed or touched: a pod
        # that merely carries our labels or name is somebody else's.
        uid = meta.get("uid")
        views = (PodView.of(x) for x in obs.pods)
        p.pods = sorted((v for v in views if uid and v.owner_uid == uid), key=lambda v: v.incarnation)
        for pod in p.pods:
            p.outcomes[pod.name] = classify(pod, p.node_of(pod), p.node_missing(pod), p.now)
        return p

    # ------------------------------------------------------------------ facts

    def node_of(self, pod: PodView) -> NodeView | None:
        return self.nodes.get(pod.node_name) if pod.node_name else None

    def node_missing(self, pod: PodView) -> bool:
        return bool(pod.node_name) and pod.node_name in self.obs.missing_nodes

    @property
    def current_name(self) -> str:
        return pod_name(self.name, self.st.incarnation)

    @property
    def current(self) -> PodView | None:
        return next((p for p in self.pods if p.name == self.current_name), None)

    @property
    def prep_name(self) -> str:
        """The current preparation pod's name (``<run>-prep-<n>``)."""
        n = self.st.preparer.incarnation if self.st.preparer is not None else 0
        return prep_pod_name(self.name, n)

    @property
    def current_prep(self) -> PodView | None:
        """The current preparation pod, while the dataset is not prepared yet."""
        if self.st.preparer is not None and self.st.preparer.prepared:
            return None
        return next((p for p in self.pods if p.name == self.prep_name), None)

    def active(self, pod: PodView) -> bool:
        """Still running (or starting) and not on its way out."""
        return not self.outcomes[pod.name].ended and not pod.deleting

    def active_pods(self) -> list[PodView]:
        return [p for p in self.pods if self.active(p)]

    def trainer_alive(self, pod: str) -> bool:
        """The trainer in this pod reported recently (so it will see a request in status)."""
        prog = self.st.progress
        if prog is None or prog.pod_name != pod or prog.state is TrainerState.stopped:
            return False
        age = (self.now - prog.heartbeat_time).total_seconds()
        return age <= 3 * self.settings.trainer_heartbeat_seconds

    # ------------------------------------------------------------------ effects

    def set_condition(self, ctype: str, value: bool, reason: str, message: str) -> None:
        self.st.conditions = cond.put(
            self.st.conditions, ctype, value, reason, message, self.now, self.generation
        )

    def event(self, etype: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(etype, reason, message))

    def apply(self, verdict: Verdict) -> None:
        """Apply a policy's conditions, Events and wake-up (its stop is the caller's to carry out)."""
        for c in verdict.conditions:
            self.set_condition(c.type, c.status, c.reason, c.message)
        self.plan.events.extend(verdict.events)
        if verdict.wake_in is not None:
            self.requeue.append(verdict.wake_in)

    def stop_pod(self, pod: str, reason: str) -> None:
        if all(name != pod for name, _ in self.plan.stop_pods):
            self.plan.stop_pods.append((pod, reason))
            self.record_uid(pod)

    def release_finalizer(self, pod: str) -> None:
        self.plan.release_finalizers.append(pod)
        self.record_uid(pod)

    def record_uid(self, pod: str) -> None:
        view = next((v for v in self.pods if v.name == pod), None)
        if view is not None and view.uid:
            self.plan.uids[pod] = view.uid

    # ------------------------------------------------------------------ the end of a pass

    def finish(self) -> Plan:
        """The plan, with the status as built; look again at the earliest clock a policy set."""
        return self.finish_at(min(self.requeue))

    def finish_at(self, requeue_after: float | None) -> Plan:
        """The plan, looking again after ``requeue_after`` seconds (None: only on a change)."""
        st = self.st
        self.set_condition(cond.ACCEPTED, *self.accepted)
        st.observed_generation = self.generation
        if st.progress is not None and st.progress.total_steps:
            st.progress_percent = round(100.0 * st.progress.step / st.progress.total_steps, 1)
        self.plan.status = operator_status(st)
        self.plan.requeue_after = requeue_after
        return self.plan
