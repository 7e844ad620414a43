"""Typed, read-only views of the Kubernetes objects the planner looks at (pods and nodes).

They are parsed once from the API's JSON (as the watch caches hold it), so policies read
``pod.deleting`` and ``node.capacity_type`` instead of chains of ``dict.get``. Pure: no client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fermata_api import parse_time
from fermata_api.meta import (
    ANNOTATION_CAPACITY,
    ANNOTATION_STOP_REASON,
    CAPACITY_LABELS,
    INSTANCE_TYPE_LABEL,
    LABEL_COMPONENT,
    LABEL_INCARNATION,
    POD_FINALIZER,
)

#: Node taints that announce the node is going away (spot notice, drain, out-of-service).
TERMINATION_TAINTS = frozenset(
    {
        "node.kubernetes.io/out-of-service",
        "karpenter.sh/disrupted",
        "karpenter.sh/disruption",
        "aws-node-termination-handler/spot-itn",
        "aws-node-termination-handler/asg-lifecycle-termination",
        "aws-node-termination-handler/scheduled-maintenance",
        "ToBeDeletedByClusterAutoscaler",
        "cloud.google.com/impending-node-termination",
    }
)


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: dict[str, str]
    taint_keys: tuple[str, ...]

    @classmethod
    def of(cls, node: dict[str, Any]) -> NodeView:
        meta = _dict(node.get("metadata"))
        taints = _dict(node.get("spec")).get("taints") or []
        return cls(
            name=str(meta.get("name") or ""),
            labels={str(k): str(v) for k, v in _dict(meta.get("labels")).items()},
            taint_keys=tuple(str(t.get("key")) for t in taints if isinstance(t, dict) and t.get("key")),
        )

    @property
    def instance_type(self) -> str | None:
        return self.labels.get(INSTANCE_TYPE_LABEL)

    @property
    def capacity_type(self) -> str | None:
        for key, values in CAPACITY_LABELS.items():
            for capacity, label_value in values.items():
                if self.labels.get(key) == label_value:
                    return capacity
        return None

    @property
    def termination_taint(self) -> str | None:
        return next((k for k in self.taint_keys if k in TERMINATION_TAINTS), None)


@dataclass(frozen=True)
class ContainerView:
    """The trainer container's state (running / terminated / waiting)."""

    started: datetime | None = None
    finished: datetime | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None
    terminated_message: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None

    @classmethod
    def of(cls, statuses: list[Any]) -> ContainerView:
        entries = [s for s in statuses if isinstance(s, dict)]
        cs = next((s for s in entries if s.get("name") == "trainer"), entries[0] if entries else {})
        state = _dict(cs.get("state"))
        running, terminated, waiting = (_dict(state.get(k)) for k in ("running", "terminated", "waiting"))
        code = terminated.get("exitCode")
        return cls(
            started=parse_time(running.get("startedAt") or terminated.get("startedAt")),
            finished=parse_time(terminated.get("finishedAt")),
            exit_code=int(code) if code is not None else None,
            terminated_reason=terminated.get("reason"),
            terminated_message=terminated.get("message"),
            waiting_reason=waiting.get("reason"),
            waiting_message=waiting.get("message"),
        )


@dataclass(frozen=True)
class PodCondition:
    status: str
    reason: str | None
    message: str | None
    last_transition: datetime | None


def controller_uid(meta: dict[str, Any]) -> str | None:
    """The UID of the object's controlling owner (ownerReferences[controller=true])."""
    for ref in meta.get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str | None
    #: UID of the controlling owner (the TrainingRun that created it).
    owner_uid: str | None
    incarnation: int
    phase: str
    node_name: str | None
    created: datetime | None
    start_time: datetime | None
    deletion: datetime | None
    finalizers: tuple[str, ...]
    annotations: dict[str, str]
    reason: str | None
    message: str | None
    container: ContainerView
    conditions: dict[str, PodCondition] = field(default_factory=dict)
    #: ``spec.schedulingGates`` names: the scheduler leaves the pod alone while any is left.
    scheduling_gates: tuple[str, ...] = ()
    #: ``app.kubernetes.io/component``: ``trainer``, or ``preparer`` for a preparation pod.
    component: str | None = None

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PodView:
        meta, spec, status = (_dict(pod.get(k)) for k in ("metadata", "spec", "status"))
        try:
            incarnation = int(_dict(meta.get("labels")).get(LABEL_INCARNATION, "-1"))
        except ValueError:
            incarnation = -1
        conditions = {
            str(c.get("type")): PodCondition(
                status=str(c.get("status")),
                reason=c.get("reason"),
                message=c.get("message"),
                last_transition=parse_time(c.get("lastTransitionTime")),
            )
            for c in status.get("conditions") or []
            if isinstance(c, dict)
        }
        return cls(
            name=str(meta.get("name") or ""),
            uid=meta.get("uid"),
            owner_uid=controller_uid(meta),
            incarnation=incarnation,
            phase=str(status.get("phase") or "Pending"),
            node_name=spec.get("nodeName") or None,
            created=parse_time(meta.get("creationTimestamp")),
            start_time=parse_time(status.get("startTime")),
            deletion=parse_time(meta.get("deletionTimestamp")),
            finalizers=tuple(meta.get("finalizers") or ()),
            annotations={str(k): str(v) for k, v in _dict(meta.get("annotations")).items()},
            reason=status.get("reason"),
            message=status.get("message"),
            container=ContainerView.of(status.get("containerStatuses") or []),
            conditions=conditions,
            scheduling_gates=tuple(
                str(g.get("name")) for g in spec.get("schedulingGates") or [] if isinstance(g, dict)
            ),
            component=_dict(meta.get("labels")).get(LABEL_COMPONENT),
        )

    @property
    def deleting(self) -> bool:
        return self.deletion is not None

    @property
    def stop_reason(self) -> str | None:
        return self.annotations.get(ANNOTATION_STOP_REASON)

    @property
    def capacity_annotation(self) -> str | None:
        return self.annotations.get(ANNOTATION_CAPACITY)

    @property
    def has_cost_finalizer(self) -> bool:
        return POD_FINALIZER in self.finalizers

    def condition_true(self, ctype: str) -> bool:
        c = self.conditions.get(ctype)
        return c is not None and c.status == "True"
