"""Kueue: a gated pod is Queued (not unscheduled, not billed); Kueue's eviction is an interruption."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from fermata_api.meta import KUEUE_ADMISSION_GATE, KUEUE_TERMINATION_CONDITION
from fermata_operator.policies import pod_outcome
from fermata_operator.policies.pod_outcome import Kind
from fermata_operator.views import NodeView, PodView
from tests.operator.factories import T0, deleting, node, pod_for, run, running, terminated, with_condition

NOW = T0 + timedelta(hours=1)


def gated(*gates: str) -> dict[str, Any]:
    p = pod_for(run())
    p["spec"]["schedulingGates"] = [{"name": g} for g in gates]
    p["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated", "message": "gated"}
    ]
    return p


def classify(p: dict[str, Any], on_node: bool = False) -> pod_outcome.Outcome:
    n = NodeView.of(node("n1")) if on_node else None
    return pod_outcome.classify(PodView.of(p), n, False, NOW)


def test_a_gated_pod_is_queued_with_its_gate_names() -> None:
    o = classify(gated(KUEUE_ADMISSION_GATE, "example.com/other"))
    assert (o.kind, o.reason) == (Kind.queued, "SchedulingGated")
    assert f"{KUEUE_ADMISSION_GATE}, example.com/other" in o.message
    assert not o.ended and o.started is None


def test_the_gates_not_the_lagging_condition_decide() -> None:
    p = gated(KUEUE_ADMISSION_GATE)
    p["spec"]["schedulingGates"] = []  # admitted; the scheduler has not looked again yet
    assert classify(p).kind is Kind.unscheduled
    assert pod_outcome.queued(PodView.of(p)) is None


def test_a_gated_pod_has_no_billing_span() -> None:
    view = PodView.of(gated(KUEUE_ADMISSION_GATE))
    o = pod_outcome.classify(view, None, False, NOW)
    assert view.node_name is None and view.start_time is None
    assert pod_outcome.billing_end(view, o, False, NOW) is None


def test_a_gated_pod_deleted_from_outside_is_an_interruption() -> None:
    o = classify(deleting(gated(KUEUE_ADMISSION_GATE), NOW))
    assert (o.kind, o.reason) == (Kind.interrupted, "PodDeleted")


def kueue_stopped(p: dict[str, Any], reason: str = "StoppedByKueue") -> dict[str, Any]:
    return with_condition(p, KUEUE_TERMINATION_CONDITION, reason=reason)


def test_kueue_termination_target_on_a_running_pod_asks_for_a_checkpoint() -> None:
    p = kueue_stopped(running(pod_for(run()), "n1", T0))
    o = classify(p, on_node=True)
    assert (o.kind, o.termination_notice) == (Kind.running, True)


@pytest.mark.parametrize(("code", "reason"), [(0, "Completed"), (143, "Error")])
def test_a_pod_kueue_preempted_is_interrupted_not_failed(code: int, reason: str) -> None:
    p = kueue_stopped(running(pod_for(run()), "n1", T0), reason="WorkloadEvicted")
    p = deleting(terminated(p, code, NOW, reason), NOW)
    p = kueue_stopped(p, reason="WorkloadEvicted")  # terminated() rewrote the conditions
    o = classify(p, on_node=True)
    assert (o.kind, o.reason) == (Kind.interrupted, "KueueWorkloadEvicted")


def test_a_false_termination_target_means_nothing() -> None:
    p = with_condition(running(pod_for(run()), "n1", T0), KUEUE_TERMINATION_CONDITION, status="False")
    o = classify(p, on_node=True)
    assert (o.kind, o.termination_notice) == (Kind.running, False)
