"""What a trainer pod's state means: still starting, running, done, failed — or interrupted.

This is where spot interruptions are told apart from application failures:

* **Interruption** (does not use the failure budget): the pod has the ``DisruptionTarget``
  condition (``PreemptionByScheduler``, ``DeletionByTaintManager``,
  ``EvictionByEvictionAPI``, ``DeletionByPodGC``, ``TerminationByKubelet``); its status reason
  is an eviction or node shutdown; it was deleted by someone other than the operator; its node
  was deleted or carries a termination taint; Kueue's ``TerminationTarget`` condition (set
  before Kueue deletes a pod whose Workload was preempted or otherwise evicted).
* **Queued** (not running, not billed, not idle): the pod is unplaced and still has scheduling
  gates (Kueue's ``kueue.x-k8s.io/admission`` until its Workload is admitted).
* **Failure**: the container exited non-zero on its own (exit code, ``OOMKilled``).
* **Config error** (permanent, not retried): the trainer's exit code 2, or a pod that cannot
  start because of its own spec (missing Secret / ConfigMap, an invalid image name). Image pull
  errors (``ErrImagePull``, ``ImagePullBackOff``) are left to the kubelet's retries: the pod is
  still starting.

A pod that is being deleted while its container still runs is *not* over yet: the trainer is
writing its SIGTERM checkpoint. It counts as interrupted once it has ended — or at once if its
node is gone, or when its kubelet has not reported for :data:`TERMINATING_PATIENCE_SECONDS`
past the deletion deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from fermata_api import EXIT_CONFIG_ERROR
from fermata_api.meta import KUEUE_TERMINATION_CONDITION
from fermata_operator.views import NodeView, PodView

INTERRUPTION_POD_REASONS = {"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated", "NodeLost"}
#: Waiting reasons that will not fix themselves: a config error, not a transient state.
PERMANENT_WAITING_REASONS = {
    "CreateContainerConfigError",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerError",
}
IMAGE_WAITING_REASONS = {"ErrImagePull", "ImagePullBackOff"}
#: How long past its deletion deadline a terminating pod is waited for before it counts as lost
#: (its kubelet is gone and will never report the container's end).
TERMINATING_PATIENCE_SECONDS = 30.0


class Kind(str, Enum):
    queued = "Queued"  # held by scheduling gates (a queue such as Kueue has not admitted it)
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
        """The container is done (a config error is done once its container has exited)."""
        if self.kind is Kind.config_error:
            return self.finished is not None
        return self.kind in {Kind.succeeded, Kind.failed, Kind.interrupted, Kind.stopped}


def _interruption(pod: PodView, node: NodeView | None, node_missing: bool) -> str | None:
    """Why the pod is being taken away from outside, if it is."""
    disruption = pod.conditions.get("DisruptionTarget")
    taint = node.termination_taint if node is not None else None
    if disruption is not None and disruption.status == "True":
        return disruption.reason or "DisruptionTarget"
    evicted = pod.conditions.get(KUEUE_TERMINATION_CONDITION)
    if evicted is not None and evicted.status == "True":
        return f"Kueue{evicted.reason or KUEUE_TERMINATION_CONDITION}"
    if pod.reason in INTERRUPTION_POD_REASONS:
        return pod.reason
    if pod.node_name and node_missing:
        return "NodeDeleted"
    if taint is not None and (pod.deleting or pod.phase == "Failed"):
        return f"NodeTerminating({taint})"
    if pod.deleting:
        return "PodDeleted"
    return None


def _ended(pod: PodView, interrupted: str | None) -> Outcome:
    """A pod in phase Succeeded or Failed."""
    c = pod.container
    args = (c.started, c.finished)
    if pod.phase == "Succeeded":
        if interrupted and (pod.deleting or _disrupted(pod)):
            # The trainer checkpointed on SIGTERM and exited 0: a stop from outside, not the end
            # of training (the planner double-checks with the trainer's own "Completed" report).
            msg = f"pod ended by {interrupted} after checkpointing"
            return Outcome(Kind.interrupted, interrupted, msg, 0, True, *args)
        return Outcome(Kind.succeeded, "Completed", "trainer exited 0", 0, False, *args)
    if interrupted:
        msg = pod.message or f"pod ended by {interrupted}"
        return Outcome(Kind.interrupted, interrupted, msg, c.exit_code, True, *args)
    reason = str(c.terminated_reason or pod.reason or "Error")
    message = (c.terminated_message or pod.message or "").strip()
    if c.exit_code == EXIT_CONFIG_ERROR:
        msg = message or "the trainer rejected its configuration or dataset (exit 2)"
        return Outcome(Kind.config_error, "TrainerConfigError", msg, c.exit_code, False, *args)
    text = f"trainer exited with code {c.exit_code} ({reason})"
    if message:
        text += f": {message[-400:]}"
    return Outcome(Kind.failed, reason, text, c.exit_code, False, *args)


def _disrupted(pod: PodView) -> bool:
    """Marked for removal from outside: the kubelet's, the scheduler's or Kueue's condition."""
    return pod.condition_true("DisruptionTarget") or pod.condition_true(KUEUE_TERMINATION_CONDITION)


def queued(pod: PodView) -> Outcome | None:
    """Held before scheduling by gates (``spec.schedulingGates``), if it is. The spec, not the
    ``PodScheduled=False/SchedulingGated`` condition, is the truth: that condition lags behind
    the gates' removal until the scheduler has looked at the pod again."""
    if pod.node_name or not pod.scheduling_gates:
        return None
    names = ", ".join(pod.scheduling_gates)
    return Outcome(Kind.queued, "SchedulingGated", f"waiting for admission (scheduling gates: {names})")


def _pending(pod: PodView, notice: bool) -> Outcome:
    c = pod.container
    held = queued(pod)
    if held is not None:
        return held
    if c.waiting_reason in PERMANENT_WAITING_REASONS:
        return Outcome(Kind.config_error, c.waiting_reason, c.waiting_message or c.waiting_reason)
    if c.waiting_reason in IMAGE_WAITING_REASONS:
        return Outcome(Kind.starting, c.waiting_reason, c.waiting_message or c.waiting_reason, None, notice)
    if not pod.node_name:
        sched = pod.conditions.get("PodScheduled")
        if sched is None:
            # Not looked at by the scheduler yet (a pod just created): nothing says it waits for
            # capacity, and saying so would post a WaitingForCapacity for nearly every new pod.
            return Outcome(Kind.starting, "Scheduling", "waiting for the scheduler", None, notice)
        message = sched.message or "waiting for a node with the requested GPU capacity"
        return Outcome(Kind.unscheduled, sched.reason or "Unschedulable", message)
    return Outcome(Kind.starting, "ContainerCreating", f"starting on {pod.node_name}", None, notice)


def classify(pod: PodView, node: NodeView | None, node_missing: bool, now: datetime) -> Outcome:
    """The meaning of one pod's state, given its node (None if unknown or gone)."""
    c = pod.container
    if pod.stop_reason and (pod.deleting or pod.phase in {"Failed", "Succeeded"}):
        return Outcome(
            Kind.stopped, "StoppedByOperator", pod.stop_reason, c.exit_code, False, c.started, c.finished
        )
    interrupted = _interruption(pod, node, node_missing)
    if pod.phase in {"Succeeded", "Failed"}:
        return _ended(pod, interrupted)
    overdue = pod.deletion is not None and (now - pod.deletion).total_seconds() > TERMINATING_PATIENCE_SECONDS
    if interrupted and (node_missing or overdue or (pod.deleting and pod.phase != "Running")):
        msg = f"pod lost: {interrupted}"
        return Outcome(Kind.interrupted, interrupted, msg, c.exit_code, True, c.started, None)
    notice = _disrupted(pod) or (node is not None and node.termination_taint is not None)
    if pod.phase == "Running":
        if pod.deleting:
            msg = f"terminating on {pod.node_name} ({interrupted}): waiting for its checkpoint"
            return Outcome(Kind.running, "Terminating", msg, None, True, c.started, None)
        return Outcome(Kind.running, "Running", f"running on {pod.node_name}", None, notice, c.started, None)
    return _pending(pod, notice)


def billing_end(pod: PodView, outcome: Outcome, node_missing: bool, now: datetime) -> datetime | None:
    """When billing of this pod stopped (None while it still runs)."""
    if outcome.finished is not None:
        return outcome.finished
    if pod.phase in {"Succeeded", "Failed"}:
        times = [c.last_transition for c in pod.conditions.values() if c.last_transition is not None]
        return max(times) if times else now
    if pod.deletion is not None and (
        node_missing
        or not pod.node_name
        or (now - pod.deletion).total_seconds() > TERMINATING_PATIENCE_SECONDS
    ):
        return min(now, pod.deletion)
    return None
