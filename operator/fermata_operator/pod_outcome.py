"""What a trainer pod's state means: still starting, running, done, failed — or interrupted.

This is where spot interruptions are told apart from application failures:

* **Interruption** (does not use the failure budget): the pod has the ``DisruptionTarget``
  condition (``PreemptionByScheduler``, ``DeletionByTaintManager``,
  ``EvictionByEvictionAPI``, ``DeletionByPodGC``, ``TerminationByKubelet``); its status reason
  is an eviction or node shutdown; it was deleted by someone other than the operator; its node
  was deleted or carries a termination taint.
* **Failure**: the container exited non-zero on its own (exit code, ``OOMKilled``), or the pod
  cannot start (image pull errors, missing Secret / ConfigMap) — the latter are *permanent*
  config errors that retrying will not fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from fermata_trainer.contract import EXIT_CONFIG_ERROR

#: Annotation the operator sets on a pod before deleting it, so the deletion is not mistaken
#: for an interruption.
STOP_REASON_ANNOTATION = "fermata.dev/stop-reason"

#: Node taints that announce the node is going away (spot notice, drain, out-of-service).
TERMINATION_TAINTS = {
    "node.kubernetes.io/out-of-service",
    "karpenter.sh/disrupted",
    "karpenter.sh/disruption",
    "aws-node-termination-handler/spot-itn",
    "aws-node-termination-handler/asg-lifecycle-termination",
    "aws-node-termination-handler/scheduled-maintenance",
    "ToBeDeletedByClusterAutoscaler",
    "cloud.google.com/impending-node-termination",
}
INTERRUPTION_POD_REASONS = {
    "Evicted",
    "Preempting",
    "Shutdown",
    "NodeShutdown",
    "Terminated",
    "NodeLost",
}
#: Waiting reasons that will not fix themselves: a config error, not a transient state.
PERMANENT_WAITING_REASONS = {
    "CreateContainerConfigError",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerError",
}
IMAGE_WAITING_REASONS = {"ErrImagePull", "ImagePullBackOff"}


class Kind(str, Enum):
    unscheduled = "Unscheduled"
    starting = "Starting"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    interrupted = "Interrupted"
    stopped = "Stopped"  # deleted by the operator on purpose
    config_error = "ConfigError"


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reason: str
    message: str
    exit_code: int | None = None
    #: The node is about to go: ask the trainer for a checkpoint now.
    termination_notice: bool = False
    started: datetime | None = None
    finished: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.kind in {Kind.succeeded, Kind.failed, Kind.interrupted, Kind.stopped}


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _condition(pod: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def node_termination_taint(node: dict[str, Any] | None) -> str | None:
    if node is None:
        return None
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("key") in TERMINATION_TAINTS:
            return str(taint["key"])
    return None


def container_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == "trainer":
            return dict(cs)
    return dict(statuses[0]) if statuses else {}


#: How long past its deletion deadline a terminating pod is waited for before it counts as lost
#: (its kubelet is gone and will never report the container's end).
TERMINATING_PATIENCE_SECONDS = 30.0


def classify(
    pod: dict[str, Any], node: dict[str, Any] | None, node_known_missing: bool, now: datetime | None = None
) -> Outcome:
    """The meaning of one pod's state, given its node (None if unknown or gone).

    A pod that is being deleted while its container still runs is *not* over yet: the trainer
    is writing its SIGTERM checkpoint. It counts as interrupted once it has ended — or at once if
    its node is gone, or when its kubelet has not reported for ``TERMINATING_PATIENCE_SECONDS``
    past the deletion deadline.
    """
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    cs = container_state(pod)
    state = cs.get("state") or {}
    running = state.get("running") or {}
    terminated = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    started = _ts(running.get("startedAt") or terminated.get("startedAt"))
    finished = _ts(terminated.get("finishedAt"))
    exit_code = terminated.get("exitCode")
    disruption = _condition(pod, "DisruptionTarget")
    disrupted = disruption is not None and disruption.get("status") == "True"
    stop_reason = (meta.get("annotations") or {}).get(STOP_REASON_ANNOTATION)
    deleting = meta.get("deletionTimestamp") is not None
    node_name = (pod.get("spec") or {}).get("nodeName")
    taint = node_termination_taint(node)
    notice = disrupted or taint is not None

    if stop_reason and (deleting or phase in {"Failed", "Succeeded"}):
        return Outcome(Kind.stopped, "StoppedByOperator", stop_reason, exit_code, False, started, finished)

    interrupted_reason: str | None = None
    if disrupted and disruption is not None:
        interrupted_reason = str(disruption.get("reason") or "DisruptionTarget")
    elif status.get("reason") in INTERRUPTION_POD_REASONS:
        interrupted_reason = str(status["reason"])
    elif node_name and node_known_missing:
        interrupted_reason = "NodeDeleted"
    elif taint is not None and (deleting or phase == "Failed"):
        interrupted_reason = f"NodeTerminating({taint})"
    elif deleting:
        interrupted_reason = "PodDeleted"

    if phase == "Succeeded":
        if interrupted_reason and (deleting or disrupted):
            # The trainer checkpointed on SIGTERM and exited 0: a stop from outside, not the end
            # of training (the planner double-checks with the trainer's own "Completed" report).
            msg = f"pod ended by {interrupted_reason} after checkpointing"
            return Outcome(Kind.interrupted, interrupted_reason, msg, 0, True, started, finished)
        return Outcome(Kind.succeeded, "Completed", "trainer exited 0", 0, False, started, finished)

    if phase == "Failed":
        if interrupted_reason:
            msg = status.get("message") or f"pod ended by {interrupted_reason}"
            return Outcome(Kind.interrupted, interrupted_reason, msg, exit_code, True, started, finished)
        reason = str(terminated.get("reason") or status.get("reason") or "Error")
        message = (terminated.get("message") or status.get("message") or "").strip()
        if exit_code == EXIT_CONFIG_ERROR:
            return Outcome(
                Kind.config_error,
                "TrainerConfigError",
                message or "the trainer rejected its configuration or dataset (exit 2)",
                exit_code,
                False,
                started,
                finished,
            )
        text = f"trainer exited with code {exit_code} ({reason})"
        if message:
            text += f": {message[-400:]}"
        return Outcome(Kind.failed, reason, text, exit_code, False, started, finished)

    deadline = _ts(meta.get("deletionTimestamp"))
    overdue = (
        deadline is not None
        and now is not None
        and (now - deadline).total_seconds() > TERMINATING_PATIENCE_SECONDS
    )
    if interrupted_reason and (node_known_missing or overdue or (deleting and phase != "Running")):
        return Outcome(
            Kind.interrupted,
            interrupted_reason,
            f"pod lost: {interrupted_reason}",
            exit_code,
            True,
            started,
            None,
        )

    if phase == "Running":
        if deleting:
            return Outcome(
                Kind.running,
                "Terminating",
                f"terminating on {node_name} ({interrupted_reason}): waiting for its checkpoint",
                None,
                True,
                started,
                None,
            )
        return Outcome(Kind.running, "Running", f"running on {node_name}", None, notice, started, None)

    # Pending
    if waiting:
        wreason = str(waiting.get("reason") or "")
        wmessage = str(waiting.get("message") or "")
        if wreason in PERMANENT_WAITING_REASONS:
            return Outcome(Kind.config_error, wreason, wmessage or wreason, None, False, None, None)
        if wreason in IMAGE_WAITING_REASONS:
            return Outcome(Kind.starting, wreason, wmessage or wreason, None, notice, None, None)
    if not node_name:
        sched = _condition(pod, "PodScheduled") or {}
        message = str(sched.get("message") or "waiting for a node with the requested GPU capacity")
        return Outcome(Kind.unscheduled, str(sched.get("reason") or "Unschedulable"), message)
    return Outcome(Kind.starting, "ContainerCreating", f"starting on {node_name}", None, notice)
