"""What a trainer pod's state means: interruptions apart from failures, config errors, billing end."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from fermata_api.meta import ANNOTATION_STOP_REASON
from fermata_operator.policies import pod_outcome
from fermata_operator.policies.pod_outcome import TERMINATING_PATIENCE_SECONDS, Kind, Outcome
from fermata_operator.views import NodeView, PodView
from tests.operator.factories import (
    T0,
    deleting,
    iso,
    node,
    pod_for,
    run,
    running,
    terminated,
    waiting,
    with_condition,
)

NOW = T0 + timedelta(hours=2)
FINISHED = T0 + timedelta(hours=1, minutes=30)
TAINT = "karpenter.sh/disrupted"


def a_pod() -> dict[str, Any]:
    return pod_for(run())


def on_node() -> dict[str, Any]:
    return running(a_pod(), "n1", T0)


def ended(code: int, reason: str = "Error", message: str | None = None) -> dict[str, Any]:
    p = terminated(on_node(), code, FINISHED, reason)
    if message is not None:
        p["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = message
    return p


def stop_annotated(p: dict[str, Any], reason: str = "BudgetExceeded") -> dict[str, Any]:
    p["metadata"].setdefault("annotations", {})[ANNOTATION_STOP_REASON] = reason
    return p


def classify(
    p: dict[str, Any],
    n: dict[str, Any] | None = None,
    node_missing: bool = False,
    now: datetime = NOW,
    default_node: bool = True,
) -> Outcome:
    if n is None and default_node and not node_missing:
        n = node("n1")
    return pod_outcome.classify(PodView.of(p), NodeView.of(n) if n else None, node_missing, now)


def tainted() -> dict[str, Any]:
    return node("n1", taints=[{"key": TAINT, "effect": "NoSchedule"}])


# ----------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize(
    "reason",
    ["PreemptionByScheduler", "DeletionByTaintManager", "EvictionByEvictionAPI", "TerminationByKubelet"],
)
def test_disruption_target_running_is_a_notice(reason: str) -> None:
    o = classify(with_condition(on_node(), "DisruptionTarget", reason=reason))
    assert (o.kind, o.reason, o.termination_notice) == (Kind.running, "Running", True)
    assert o.started == T0 and not o.ended


@pytest.mark.parametrize("reason", ["PreemptionByScheduler", "DeletionByPodGC"])
def test_disruption_target_failed_is_an_interruption(reason: str) -> None:
    o = classify(with_condition(ended(143), "DisruptionTarget", reason=reason))
    assert o == Outcome(Kind.interrupted, reason, f"pod ended by {reason}", 143, True, T0, FINISHED)
    assert o.ended


def test_disruption_target_without_reason() -> None:
    o = classify(with_condition(ended(143), "DisruptionTarget"))
    assert (o.kind, o.reason) == (Kind.interrupted, "DisruptionTarget")


def test_disruption_target_false_is_no_interruption() -> None:
    o = classify(with_condition(ended(1), "DisruptionTarget", status="False", reason="PreemptionByScheduler"))
    assert o.kind is Kind.failed


def test_checkpointed_exit_0_after_disruption_is_an_interruption_not_success() -> None:
    o = classify(with_condition(ended(0, "Completed"), "DisruptionTarget", reason="EvictionByEvictionAPI"))
    assert o.kind is Kind.interrupted
    assert o.reason == "EvictionByEvictionAPI"
    assert o.message == "pod ended by EvictionByEvictionAPI after checkpointing"
    assert o.exit_code == 0 and o.termination_notice


@pytest.mark.parametrize("reason", sorted(pod_outcome.INTERRUPTION_POD_REASONS))
def test_eviction_and_node_shutdown_reasons(reason: str) -> None:
    p = on_node()
    p["status"] = {
        "phase": "Failed",
        "reason": reason,
        "message": "The node was low on resource: memory.",
        "startTime": iso(T0),
    }
    o = classify(p)
    assert (o.kind, o.reason, o.message) == (
        Kind.interrupted,
        reason,
        "The node was low on resource: memory.",
    )
    assert o.exit_code is None and o.termination_notice


def test_node_deleted_under_a_running_pod() -> None:
    o = classify(on_node(), node_missing=True)
    assert o == Outcome(Kind.interrupted, "NodeDeleted", "pod lost: NodeDeleted", None, True, T0, None)


def test_node_deleted_does_not_matter_before_scheduling() -> None:
    o = classify(a_pod(), node_missing=True)
    assert o.kind is Kind.starting and o.reason == "Scheduling"


def test_termination_taint_running_is_a_notice() -> None:
    o = classify(on_node(), tainted())
    assert (o.kind, o.termination_notice) == (Kind.running, True)


def test_termination_taint_failed_is_an_interruption() -> None:
    o = classify(ended(137, "Error"), tainted())
    assert (o.kind, o.reason) == (Kind.interrupted, f"NodeTerminating({TAINT})")
    assert o.exit_code == 137


def test_termination_taint_deleting_waits_for_the_checkpoint() -> None:
    o = classify(deleting(on_node(), NOW), tainted())
    assert o.kind is Kind.running and o.reason == "Terminating"
    assert o.message == f"terminating on n1 (NodeTerminating({TAINT})): waiting for its checkpoint"


def test_untracked_taint_is_no_notice() -> None:
    n = node("n1", taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])
    o = classify(on_node(), n)
    assert (o.kind, o.termination_notice) == (Kind.running, False)


def test_deleted_by_someone_while_running_waits_for_the_checkpoint() -> None:
    o = classify(deleting(on_node(), NOW - timedelta(seconds=10)))
    assert o == Outcome(
        Kind.running,
        "Terminating",
        "terminating on n1 (PodDeleted): waiting for its checkpoint",
        None,
        True,
        T0,
    )


def test_deleted_by_someone_before_running_is_lost_at_once() -> None:
    p = deleting(waiting(a_pod(), "ContainerCreating"), NOW + timedelta(seconds=150))
    o = classify(p)
    assert (o.kind, o.reason, o.message) == (Kind.interrupted, "PodDeleted", "pod lost: PodDeleted")


def test_deleted_by_someone_and_checkpointed_exit_0() -> None:
    o = classify(deleting(ended(0, "Completed"), NOW))
    assert (o.kind, o.reason, o.exit_code) == (Kind.interrupted, "PodDeleted", 0)
    assert o.message == "pod ended by PodDeleted after checkpointing"


def test_terminating_patience() -> None:
    deadline = NOW - timedelta(seconds=TERMINATING_PATIENCE_SECONDS)
    p = deleting(on_node(), deadline)
    assert TERMINATING_PATIENCE_SECONDS == 30.0
    assert classify(p, now=NOW).kind is Kind.running  # exactly at the patience: still waiting
    late = classify(p, now=NOW + timedelta(seconds=1))
    assert (late.kind, late.reason, late.message) == (Kind.interrupted, "PodDeleted", "pod lost: PodDeleted")
    assert late.termination_notice and late.finished is None


def test_terminating_with_node_gone_is_lost_at_once() -> None:
    o = classify(deleting(on_node(), NOW + timedelta(seconds=150)), node_missing=True)
    assert (o.kind, o.reason) == (Kind.interrupted, "NodeDeleted")


# ----------------------------------------------------------------------------- operator's own stop


@pytest.mark.parametrize(
    "p",
    [
        deleting(stop_annotated(running(pod_for(run()), "n1", T0)), NOW),
        stop_annotated(terminated(running(pod_for(run()), "n1", T0), 0, FINISHED, "Completed")),
        stop_annotated(terminated(running(pod_for(run()), "n1", T0), 137, FINISHED)),
    ],
    ids=["deleting", "succeeded", "failed"],
)
def test_stopped_by_the_operator(p: dict[str, Any]) -> None:
    o = classify(p, node_missing=True)  # even with its node gone: our stop, not an interruption
    assert (o.kind, o.reason, o.message) == (Kind.stopped, "StoppedByOperator", "BudgetExceeded")
    assert o.ended and not o.termination_notice


def test_stop_annotation_alone_does_not_end_a_running_pod() -> None:
    o = classify(stop_annotated(on_node()))
    assert o.kind is Kind.running


# ----------------------------------------------------------------------------- exits


def test_exit_0_succeeded() -> None:
    o = classify(ended(0, "Completed"))
    assert o == Outcome(Kind.succeeded, "Completed", "trainer exited 0", 0, False, T0, FINISHED)
    assert o.ended


def test_exit_0_with_node_gone_afterwards_is_still_success() -> None:
    assert classify(ended(0, "Completed"), node_missing=True).kind is Kind.succeeded


def test_exit_2_config_error() -> None:
    o = classify(ended(2))
    assert (o.kind, o.reason, o.exit_code) == (Kind.config_error, "TrainerConfigError", 2)
    assert o.message == "the trainer rejected its configuration or dataset (exit 2)"
    o = classify(ended(2, message="  dataset has no clips with 3 of the proxy tags \n"))
    assert o.message == "dataset has no clips with 3 of the proxy tags"


def test_exit_1_failed() -> None:
    o = classify(ended(1))
    assert o == Outcome(Kind.failed, "Error", "trainer exited with code 1 (Error)", 1, False, T0, FINISHED)
    assert o.ended


def test_failure_message_keeps_the_last_400_characters() -> None:
    text = "x" * 500 + "Traceback: boom"
    o = classify(ended(1, message=text))
    assert o.message == "trainer exited with code 1 (Error): " + text[-400:]
    assert o.message.endswith("boom")


def test_oom_killed() -> None:
    o = classify(ended(137, "OOMKilled"))
    assert (o.kind, o.reason, o.exit_code) == (Kind.failed, "OOMKilled", 137)
    assert o.message == "trainer exited with code 137 (OOMKilled)"


# ----------------------------------------------------------------------------- not started yet


@pytest.mark.parametrize("reason", sorted(pod_outcome.PERMANENT_WAITING_REASONS))
def test_permanent_waiting_reasons_are_config_errors(reason: str) -> None:
    o = classify(waiting(a_pod(), reason, 'secret "s3-creds" not found'))
    assert (o.kind, o.reason, o.message) == (Kind.config_error, reason, 'secret "s3-creds" not found')
    assert classify(waiting(a_pod(), reason)).message == reason


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull"])
def test_image_pull_is_still_starting(reason: str) -> None:
    o = classify(waiting(a_pod(), reason, "Back-off pulling image"))
    assert (o.kind, o.reason, o.message) == (Kind.starting, reason, "Back-off pulling image")
    assert not o.ended


def test_image_pull_on_a_tainted_node_carries_the_notice() -> None:
    assert classify(waiting(a_pod(), "ImagePullBackOff"), tainted()).termination_notice


def test_unscheduled() -> None:
    p = with_condition(a_pod(), "PodScheduled", status="False", reason="Unschedulable")
    p["status"]["conditions"][0]["message"] = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    o = classify(p, default_node=False)
    assert (o.kind, o.reason) == (Kind.unscheduled, "Unschedulable")
    assert o.message == "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    # The scheduler said no more than "not scheduled": the default message.
    terse = with_condition(a_pod(), "PodScheduled", status="False", reason="Unschedulable")
    terse["status"]["conditions"][0].pop("message", None)
    assert classify(terse, default_node=False).message == "waiting for a node with the requested GPU capacity"


def test_a_pod_the_scheduler_has_not_looked_at_yet_is_not_waiting_for_capacity() -> None:
    bare = classify(a_pod(), default_node=False)
    assert (bare.kind, bare.reason, bare.message) == (
        Kind.starting,
        "Scheduling",
        "waiting for the scheduler",
    )
    assert not bare.ended and bare.started is None


def test_container_creating() -> None:
    p = a_pod()
    p["spec"]["nodeName"] = "n1"
    o = classify(p)
    assert (o.kind, o.reason, o.message) == (Kind.starting, "ContainerCreating", "starting on n1")


# ----------------------------------------------------------------------------- billing end


def billing_end(p: dict[str, Any], node_missing: bool = False, now: datetime = NOW) -> datetime | None:
    view = PodView.of(p)
    n = None if node_missing else NodeView.of(node("n1"))
    outcome = pod_outcome.classify(view, n, node_missing, now)
    return pod_outcome.billing_end(view, outcome, node_missing, now)


def test_billing_end_running_is_open() -> None:
    assert billing_end(on_node()) is None


def test_billing_end_at_the_container_finish() -> None:
    assert billing_end(ended(0, "Completed")) == FINISHED
    assert billing_end(ended(1)) == FINISHED
    assert billing_end(stop_annotated(ended(143))) == FINISHED


def test_billing_end_of_an_ended_pod_without_container_finish() -> None:
    p = on_node()
    p["status"] = {
        "phase": "Failed",
        "reason": "Evicted",
        "startTime": iso(T0),
        "conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": iso(T0 + timedelta(minutes=50))},
            {
                "type": "DisruptionTarget",
                "status": "True",
                "lastTransitionTime": iso(T0 + timedelta(minutes=40)),
            },
        ],
    }
    assert billing_end(p) == T0 + timedelta(minutes=50)
    del p["status"]["conditions"]
    assert billing_end(p) == NOW


def test_billing_end_of_a_terminating_pod() -> None:
    d = NOW - timedelta(seconds=10)
    assert billing_end(deleting(on_node(), d)) is None  # still writing its checkpoint
    overdue = NOW - timedelta(seconds=TERMINATING_PATIENCE_SECONDS + 1)
    assert billing_end(deleting(on_node(), overdue)) == overdue  # kubelet gone: bill to the deletion


def test_billing_end_when_the_node_is_gone() -> None:
    future = NOW + timedelta(seconds=150)
    assert billing_end(deleting(on_node(), future), node_missing=True) == NOW
    past = NOW - timedelta(seconds=5)
    assert billing_end(deleting(on_node(), past), node_missing=True) == past


def test_billing_end_of_an_unscheduled_deleted_pod() -> None:
    d = NOW + timedelta(seconds=30)
    assert billing_end(deleting(a_pod(), d)) == NOW
