"""The reconcile planner against hand-built API objects: every decision, no cluster needed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from fermata_api import TrainingRunStatus
from fermata_api.meta import ANNOTATION_STOP_REASON, POD_FINALIZER
from fermata_operator import podspec
from fermata_operator.planner import (
    Observed,
    Plan,
    first_write_hold,
    merge_patch,
    plan,
    refused,
    status_changed,
)
from fermata_operator.policies.prices import PriceTable
from fermata_operator.settings import OperatorSettings
from tests.operator.factories import T0, iso, node, pod_for, progress, run, running, terminated, waiting

SETTINGS = OperatorSettings()
NODES = {"spot-1": node("spot-1"), "od-1": node("od-1", capacity="on-demand")}


def step(
    r: dict[str, Any], pods: list[dict[str, Any]], at: timedelta, missing: set[str] | None = None
) -> Plan:
    obs = Observed(
        run=r, pods=pods, nodes=NODES, missing_nodes=missing or set(), prices=PriceTable(), now=T0 + at
    )
    result = plan(obs, SETTINGS)
    # Apply the operator-owned status like the controller would (trainer keys survive).
    trainer = {k: v for k, v in (r.get("status") or {}).items() if k in {"progress", "lastCheckpoint"}}
    r["status"] = {**result.status, **trainer}
    return result


def cond(r: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in r["status"]["conditions"] if c["type"] == ctype)


def test_new_run_creates_the_namespace_identity_and_one_pod() -> None:
    r = run()
    p = step(r, [], timedelta(0))
    kinds = [o["kind"] for o in p.create]
    # The namespace's trainer identity (shared, created once per namespace), then the pod.
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Pod"]
    assert all(podspec.is_identity(o) for o in p.create[:3])
    pod = p.create[-1]
    assert pod["metadata"]["name"] == "demo-0"
    assert r["status"]["phase"] == "Pending"
    assert r["status"]["pod"]["name"] == "demo-0"
    assert r["status"]["capacity"] == "spot"
    # Re-planning from the written status with the pod not yet in the cache creates the same pod name.
    again = step(r, [], timedelta(seconds=1))
    assert [o["metadata"]["name"] for o in again.create if o["kind"] == "Pod"] == ["demo-0"]


def test_pending_unscheduled_is_waiting_for_capacity_not_idle() -> None:
    r = run(idle={"timeout": "1m"})
    step(r, [], timedelta(0))
    pod = pod_for(r)
    pod["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/4 nodes are available",
        }
    ]
    step(r, [pod], timedelta(seconds=5))
    p = step(r, [pod], timedelta(hours=3))
    assert r["status"]["phase"] == "Pending"
    assert cond(r, "WaitingForCapacity")["status"] == "True"
    assert r["status"]["waitingForCapacitySince"] == iso(T0 + timedelta(seconds=5))
    assert not p.stop_pods


def test_running_accrues_cost_from_node_price() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = progress(50, 1000, T0 + timedelta(hours=2))
    step(r, [pod], timedelta(hours=2))
    c = r["status"]["cost"]
    assert r["status"]["phase"] == "Running"
    assert c["hourlyRateUSD"] == pytest.approx(0.39)
    assert c["accruedUSD"] == pytest.approx(0.78)
    assert c["remainingUSD"] == pytest.approx(600 - 0.78)


def test_budget_exceeded_stops_pod_with_no_go() -> None:
    r = run(budget={"maxUSD": 1.0})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = progress(10, 100, T0 + timedelta(hours=2))
    p = step(r, [pod], timedelta(hours=2, minutes=34))  # 2.567 h x 0.39 = $1.001
    assert ("demo-0", "BudgetExceeded") in p.stop_pods
    assert r["status"]["phase"] == "BudgetExceeded"
    assert r["status"]["decision"] == "NO-GO"
    assert "budget" in r["status"]["decisionReason"]
    assert cond(r, "BudgetExceeded")["status"] == "True"


def test_budget_warning_and_wakeup_at_crossing() -> None:
    r = run(budget={"maxUSD": 1.0, "warnAtFraction": 0.5})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = progress(10, 100, T0 + timedelta(hours=1, minutes=30))
    p = step(r, [pod], timedelta(hours=1, minutes=30))  # $0.585
    assert cond(r, "BudgetWarning")["status"] == "True"
    assert any(e.reason == "BudgetWarning" for e in p.events)
    # Wakes up when the budget is reached: (1 - 0.585) / 0.39 h = 3830.8 s.
    assert p.requeue_after == pytest.approx(min(SETTINGS.resync_seconds, 3830.77), rel=1e-3)


def test_projected_overrun_stops_only_when_enabled() -> None:
    for enabled in (False, True):
        r = run(budget={"maxUSD": 10.0, "stopOnProjectedOverrun": enabled})
        step(r, [], timedelta(0))
        pod = running(pod_for(r), "spot-1", T0)
        # 8 samples/step, 0.008 samples/s -> 1000 s/step; 1000 steps left -> 277 h -> $108
        r["status"]["progress"] = progress(1, 1001, T0 + timedelta(minutes=10), samplesPerSecond=0.008)
        step(r, [pod], timedelta(minutes=10))
        assert r["status"]["cost"]["projectedTotalUSD"] > 10
        assert (r["status"]["phase"] == "BudgetExceeded") is enabled


def test_idle_on_stale_heartbeat_low_gpu_and_no_progress() -> None:
    # stale heartbeat
    r = run(idle={"timeout": "10m"})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = progress(5, 100, T0 + timedelta(minutes=1))
    step(r, [pod], timedelta(minutes=5))
    assert r["status"]["phase"] == "Running"
    p = step(r, [pod], timedelta(minutes=11, seconds=1))
    assert r["status"]["phase"] == "IdleStopped"
    assert cond(r, "Idle")["reason"] == "HeartbeatStale"
    assert ("demo-0", "Idle") in p.stop_pods

    # low GPU utilisation with fresh heartbeats and advancing steps
    r = run(idle={"timeout": "10m", "minGpuUtilization": 0.5})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    for minute in range(0, 12):
        r["status"]["progress"] = progress(
            minute + 1, 100, T0 + timedelta(minutes=minute), gpuUtilization=0.1
        )
        step(r, [pod], timedelta(minutes=minute))
    assert r["status"]["phase"] == "IdleStopped"
    assert cond(r, "Idle")["reason"] == "LowGpuUtilization"

    # step stuck while heartbeats continue
    r = run(idle={"timeout": "10m"})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    for minute in range(0, 12):
        r["status"]["progress"] = progress(7, 100, T0 + timedelta(minutes=minute), gpuUtilization=0.9)
        step(r, [pod], timedelta(minutes=minute))
    assert r["status"]["phase"] == "IdleStopped"
    assert cond(r, "Idle")["reason"] == "NoProgress"


@pytest.mark.parametrize(
    "disrupt",
    ["DisruptionTarget", "NodeDeleted", "Evicted", "PodDeleted"],
)
def test_interruption_recreates_pod_without_using_failure_budget(disrupt: str) -> None:
    r = run(failures={"maxRetries": 0}, spot={"backoffSeconds": 10})
    r["status"]["lastCheckpoint"] = {
        "uri": "s3://ml-runs/demo/checkpoints/step-000000100/manifest.json",
        "step": 100,
        "digest": "sha256:ab",
        "time": iso(T0),
    }
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    missing: set[str] = set()
    if disrupt == "DisruptionTarget":
        pod = terminated(pod, 143, T0 + timedelta(hours=1), reason="Error")
        pod["status"]["conditions"].append(
            {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}
        )
    elif disrupt == "NodeDeleted":
        missing = {"spot-1"}
    elif disrupt == "Evicted":
        pod["status"] = {
            "phase": "Failed",
            "reason": "Evicted",
            "message": "node low on memory",
            "startTime": iso(T0),
        }
    else:
        # Deleted by someone else: while its container still runs it is only terminating ...
        pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(hours=1))
        p = step(r, [pod], timedelta(hours=1), missing)
        assert r["status"]["interruptions"] == 0 and not p.create
        assert r["status"]["control"]["checkpointRequest"]["reason"] == "interruption"
        # ... and interrupted once the kubelet reports the container's end.
        pod = terminated(pod, 0, T0 + timedelta(hours=1))
    p = step(r, [pod], timedelta(hours=1), missing)
    assert r["status"]["interruptions"] == 1
    assert r["status"]["failures"] == 0
    assert r["status"]["incarnation"] == 1
    assert r["status"]["phase"] == "Pending"
    assert any(e.reason == "Interrupted" for e in p.events)
    # Backoff respected, then the new pod resumes from the last checkpoint.
    assert not step(r, [pod], timedelta(hours=1, seconds=5), missing).create
    p = step(r, [pod], timedelta(hours=1, seconds=11), missing)
    new = [o for o in p.create if o["kind"] == "Pod"]
    assert [o["metadata"]["name"] for o in new] == ["demo-1"]
    env = {e["name"]: e.get("value") for e in new[0]["spec"]["containers"][0]["env"]}
    assert env["FERMATA_RESUME_FROM"].endswith("step-000000100/manifest.json")
    # Counted once: replanning does not count it again.
    step(r, [pod], timedelta(hours=1, seconds=12), missing)
    assert r["status"]["interruptions"] == 1


def test_failure_uses_failure_budget_then_fails_with_reason() -> None:
    r = run(failures={"maxRetries": 1, "backoffSeconds": 0})
    step(r, [], timedelta(0))
    pod0 = terminated(running(pod_for(r), "od-1", T0), 1, T0 + timedelta(minutes=3))
    step(r, [pod0], timedelta(minutes=3))
    assert (r["status"]["failures"], r["status"]["interruptions"], r["status"]["phase"]) == (1, 0, "Pending")
    step(r, [pod0], timedelta(minutes=3, seconds=1))
    pod1 = terminated(
        running(pod_for(r, 1), "od-1", T0 + timedelta(minutes=4)),
        137,
        T0 + timedelta(minutes=5),
        reason="OOMKilled",
    )
    step(r, [pod0, pod1], timedelta(minutes=5))
    assert r["status"]["phase"] == "Failed"
    assert r["status"]["failures"] == 2
    assert "OOMKilled" in r["status"]["message"]
    assert cond(r, "Failed")["reason"] == "OOMKilled"


def test_config_error_exit_code_fails_without_retry() -> None:
    r = run(failures={"maxRetries": 5})
    step(r, [], timedelta(0))
    pod = terminated(running(pod_for(r), "od-1", T0), 2, T0 + timedelta(minutes=1))
    step(r, [pod], timedelta(minutes=1))
    assert r["status"]["phase"] == "Failed"
    assert r["status"]["failures"] == 0


def test_missing_secret_is_a_clear_condition() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = pod_for(r)
    pod["spec"]["nodeName"] = "spot-1"
    pod["status"] = {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {
                    "waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": 'secret "s3-creds" not found',
                    }
                },
            }
        ],
    }
    step(r, [pod], timedelta(seconds=30))
    assert r["status"]["phase"] == "Failed"
    assert 'secret "s3-creds" not found' in r["status"]["message"]


def test_fallback_to_on_demand_after_n_interruptions() -> None:
    r = run(spot={"maxInterruptions": 5, "fallbackToOnDemandAfter": 2, "backoffSeconds": 0})
    pods: list[dict[str, Any]] = []
    t = timedelta(0)
    for i in range(3):
        p = step(r, pods, t)
        created = next(o for o in p.create if o["kind"] == "Pod")
        terms = created["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        capacity = terms[0]["matchExpressions"][0]["values"][0]
        assert capacity == ("spot" if i < 2 else "on-demand")
        created["status"] = {}
        pod = running(created, "spot-1" if i < 2 else "od-1", T0 + t)
        pods.append(pod)
        t += timedelta(minutes=10)
        if i < 2:
            pod = terminated(pod, 143, T0 + t)
            pod["status"]["conditions"].append(
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
            )
            pod["metadata"]["deletionTimestamp"] = iso(T0 + t)
            pods[-1] = pod
            step(r, pods, t)
            t += timedelta(seconds=1)
    assert r["status"]["capacity"] == "on-demand"
    assert r["status"]["interruptions"] == 2


def test_too_many_interruptions_fail_the_run() -> None:
    r = run(spot={"maxInterruptions": 1, "fallbackToOnDemandAfter": 0, "backoffSeconds": 0})
    pods: list[dict[str, Any]] = []
    t = timedelta(0)
    for i in range(2):
        p = step(r, pods, t)
        created = next(o for o in p.create if o["kind"] == "Pod")
        pod = running(created, "spot-1", T0 + t)
        pod["metadata"]["deletionTimestamp"] = iso(T0 + t + timedelta(minutes=1))
        pods.append(pod)
        t += timedelta(minutes=2)
        step(r, pods, t)
        t += timedelta(seconds=1)
        assert r["status"]["interruptions"] == i + 1
    assert r["status"]["phase"] == "Failed"
    assert cond(r, "Failed")["reason"] == "TooManyInterruptions"


def test_termination_notice_requests_checkpoint_once() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-2", T0)
    NODES["spot-2"] = node(
        "spot-2", taints=[{"key": "aws-node-termination-handler/spot-itn", "effect": "NoSchedule"}]
    )
    try:
        p = step(r, [pod], timedelta(minutes=1))
        req = r["status"]["control"]["checkpointRequest"]
        assert req["reason"] == "interruption" and req["id"] == "demo-0-termination-notice"
        assert any(e.reason == "TerminationNotice" for e in p.events)
        p = step(r, [pod], timedelta(minutes=2))
        assert not any(e.reason == "TerminationNotice" for e in p.events)
    finally:
        del NODES["spot-2"]


@pytest.mark.parametrize(
    ("val_loss", "auth", "expected", "phase"),
    [(3.2, 0.40, "GO", "Running"), (3.6, 0.40, "CONDITIONAL-GO", "Running"), (4.5, 0.20, "NO-GO", "Stopped")],
)
def test_gate_decisions(val_loss: float, auth: float, expected: str, phase: str) -> None:
    gate = {
        "name": "week-5",
        "at": {"elapsed": "35d"},
        "require": {"minAuthenticity": 0.35, "maxValidationLoss": 3.5, "maxCostUSD": 600},
        "margin": 0.05,
    }
    r = run(gates=[gate], budget={"maxUSD": 1000}, idle={"timeout": "1000h"})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = progress(
        500, 1000, T0 + timedelta(days=34), validationLoss=val_loss, authenticity=auth, evaluatedStep=400
    )
    step(r, [pod], timedelta(days=34))
    assert r["status"].get("gates", []) == []
    # The milestone comes at step 500; the newest evaluation (step 400) is older: the gate waits
    # and asks the trainer for one at or after step 500.
    r["status"]["progress"]["heartbeatTime"] = iso(T0 + timedelta(days=35))
    p = step(r, [pod], timedelta(days=35, seconds=1))
    assert "decision" not in r["status"] and not [e for e in p.events if e.reason.startswith("Gate")]
    assert r["status"]["pendingGates"][0]["name"] == "week-5"
    assert r["status"]["pendingGates"][0]["dueStep"] == 500
    asked = r["status"]["control"]["evaluationRequest"]
    assert asked["minStep"] == 500
    r["status"]["progress"].update(step=505, evaluatedStep=505, evaluationRequestAck=asked["id"])
    p = step(r, [pod], timedelta(days=35, seconds=2))
    assert r["status"]["decision"] == expected
    assert r["status"]["gates"][0]["evaluatedStep"] == 505
    assert "pendingGates" not in r["status"] or r["status"]["pendingGates"] == []
    assert "evaluationRequest" not in r["status"].get("control", {})
    outcome = r["status"]["gates"][0]
    assert outcome["name"] == "week-5" and outcome["evidence"]["validationLoss"] == val_loss
    assert r["status"]["phase"] == phase
    assert not p.stop_pods
    assert len([e for e in p.events if e.reason.startswith("Gate")]) == 1
    if expected == "NO-GO":
        # The live trainer is asked to checkpoint and exit by itself ...
        req = r["status"]["control"]["checkpointRequest"]
        assert req["stop"] is True and req["id"] == "demo-0-stop-gatenogo"
        assert not step(r, [pod], timedelta(days=35, seconds=30)).stop_pods
        # ... and is stopped the hard way if it has not acknowledged within the timeout.
        late = step(r, [pod], timedelta(days=35, seconds=2 + SETTINGS.checkpoint_request_timeout_seconds + 1))
        assert ("demo-0", "Stopped") in late.stop_pods
        report = r["status"]["control"]["stopReport"]
        assert report["reason"] == "GateNoGo" and report["decision"] == "NO-GO"
        assert report["evidence"]["validationLoss"] == val_loss
        assert r["status"]["abortReport"]["uri"] == f"s3://ml-runs/demo/reports/{report['id']}.json"


def test_completion_gives_final_decision_and_releases_finalizer() -> None:
    r = run(gates=[{"name": "final-quality", "at": {"step": 10**6}, "require": {"maxValidationLoss": 3.5}}])
    step(r, [], timedelta(0))
    pod = terminated(running(pod_for(r), "spot-1", T0), 0, T0 + timedelta(hours=1))
    r["status"]["progress"] = progress(1000, 1000, T0 + timedelta(hours=1), validationLoss=3.1)
    p = step(r, [pod], timedelta(hours=1, seconds=5))
    assert r["status"]["phase"] == "Succeeded"
    assert r["status"]["decision"] == "GO"
    assert r["status"]["gates"][-1]["name"] == "final"
    assert p.release_finalizers == ["demo-0"]
    assert r["status"]["cost"]["accruedUSD"] == pytest.approx(0.39)
    assert r["status"]["cost"]["segments"][0]["end"]


def test_suspend_then_resume_keeps_cost_history() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    step(r, [pod], timedelta(hours=1))
    r["spec"]["suspend"] = True
    p = step(r, [pod], timedelta(hours=1))
    assert ("demo-0", "Suspended") in p.stop_pods
    assert r["status"]["phase"] == "Suspended"
    pod = terminated(pod, 0, T0 + timedelta(hours=1, minutes=1), phase="Failed")
    pod["metadata"]["annotations"][ANNOTATION_STOP_REASON] = "Suspended"
    pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(hours=1, minutes=1))
    p = step(r, [pod], timedelta(hours=2))
    assert p.release_finalizers == ["demo-0"]
    accrued = r["status"]["cost"]["accruedUSD"]
    assert accrued == pytest.approx(0.39 * (61 / 60), rel=1e-3)
    r["spec"]["suspend"] = False
    p = step(r, [pod], timedelta(hours=3))
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "Pod"] == ["demo-1"]
    assert r["status"]["cost"]["accruedUSD"] == pytest.approx(accrued)
    assert r["status"]["interruptions"] == 0 and r["status"]["failures"] == 0


def test_restart_recomputes_same_cost_from_pod_facts() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    step(r, [pod], timedelta(minutes=30))
    # A fresh planner (operator restart) with the same facts gets the same figure.
    fresh = run(status=dict(r["status"]))
    step(fresh, [pod], timedelta(minutes=30))
    assert fresh["status"]["cost"]["accruedUSD"] == r["status"]["cost"]["accruedUSD"]
    # A closed segment is never recounted when the pod is seen again.
    ended = terminated(pod, 143, T0 + timedelta(minutes=40))
    ended["metadata"]["annotations"][ANNOTATION_STOP_REASON] = "superseded"
    step(r, [ended], timedelta(minutes=50))
    step(r, [ended], timedelta(minutes=70))
    assert r["status"]["cost"]["accruedUSD"] == pytest.approx(0.39 * 40 / 60, rel=1e-4)


def test_invalid_spec_is_a_condition_not_a_crash() -> None:
    r = run()
    r["spec"]["training"] = {"batchSize": "eight"}
    p = step(r, [], timedelta(0))
    assert not p.create
    assert cond(r, "Accepted")["status"] == "False"
    assert "batchSize" in cond(r, "Accepted")["message"]
    assert p.requeue_after is None


def test_unknown_price_starts_no_pod_and_says_how_to_add_one() -> None:
    r = run()
    r["spec"]["resources"]["instanceTypes"] = ["x9.mega"]
    p = step(r, [], timedelta(0))
    assert p.create == []
    accepted = cond(r, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "PriceUnknown"
    assert "x9.mega/spot" in accepted["message"] and "spec.budget.prices" in accepted["message"]
    assert [e.reason for e in p.events] == ["PriceUnknown"]
    assert r["status"]["phase"] == "Pending"
    # Said once, not on every pass.
    assert step(r, [], timedelta(minutes=1)).events == []
    # A price for it (here a spec override) lets the run start.
    r["spec"]["budget"]["prices"] = [{"instanceType": "x9.mega", "capacityType": "spot", "hourlyUSD": 2.0}]
    p = step(r, [], timedelta(minutes=2))
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "Pod"] == ["demo-0"]
    assert cond(r, "Accepted")["status"] == "True"


def test_a_pod_on_an_unpriced_node_is_billed_at_the_worst_case_not_zero() -> None:
    r = run()
    r["spec"]["resources"]["instanceTypes"] = ["g4dn.xlarge", "g5.xlarge"]
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "weird", T0)
    NODES["weird"] = node("weird", instance_type="x9.mega")  # a node whose type we cannot price
    try:
        step(r, [pod], timedelta(hours=1))
    finally:
        del NODES["weird"]
    assert cond(r, "Accepted")["reason"] == "UnknownPrice"
    assert "x9.mega" in cond(r, "Accepted")["message"]
    # The highest price the run could pay: g4dn.xlarge on-demand ($1.30/h, above g5.xlarge's).
    assert r["status"]["cost"]["accruedUSD"] == pytest.approx(1.30, rel=1e-3)


def test_interruption_while_suspending_still_counts() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    step(r, [pod], timedelta(minutes=10))
    r["spec"]["suspend"] = True
    # The node was reclaimed before our stop reached the pod: the kubelet marks it disrupted.
    pod = terminated(pod, 143, T0 + timedelta(minutes=11), phase="Failed")
    pod["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
    )
    step(r, [pod], timedelta(minutes=11))
    assert r["status"]["phase"] == "Suspended"
    assert r["status"]["interruptions"] == 1
    assert cond(r, "Interrupted")["reason"] == "DeletionByTaintManager"
    step(r, [pod], timedelta(minutes=12))
    assert r["status"]["interruptions"] == 1  # counted once


def test_a_new_pod_does_not_inherit_the_previous_pods_checkpoint_request() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-2", T0)
    NODES["spot-2"] = node(
        "spot-2", taints=[{"key": "aws-node-termination-handler/spot-itn", "effect": "NoSchedule"}]
    )
    try:
        step(r, [pod], timedelta(minutes=1))
        assert r["status"]["control"]["checkpointRequest"]["id"] == "demo-0-termination-notice"
        pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(minutes=2))
        pod = terminated(pod, 0, T0 + timedelta(minutes=2))
        step(r, [pod], timedelta(minutes=2))  # interrupted: wait out the backoff
        p = step(r, [pod], timedelta(minutes=10))
    finally:
        del NODES["spot-2"]
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "Pod"] == ["demo-1"]
    assert "checkpointRequest" not in r["status"].get("control", {})


def test_eta_and_projection_count_every_gpu() -> None:
    def remaining(gpus: int) -> tuple[float, float]:
        r = run(resources={"gpus": gpus})
        step(r, [], timedelta(0))
        pod = running(pod_for(r), "spot-1", T0)
        # 100 of 1000 steps done at 16 samples/s (global).
        r["status"]["progress"] = progress(100, 1000, T0 + timedelta(minutes=10), samplesPerSecond=16.0)
        step(r, [pod], timedelta(minutes=10))
        st = r["status"]
        return st["eta"]["remainingSeconds"], st["eta"]["remainingCostUSD"]

    one, four = remaining(1), remaining(4)
    assert one[0] == pytest.approx(900 * 8 / 16.0)  # 900 steps × batch 8 ÷ 16 samples/s
    assert four[0] == pytest.approx(4 * one[0])
    assert four[1] == pytest.approx(4 * one[1], abs=1e-3)  # both rounded to 4 decimals


def test_preparing_is_not_idle_until_its_own_allowance() -> None:
    r = run(idle={"timeout": "10m", "preparationTimeout": "2h"})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = {**progress(0, 100, T0 + timedelta(minutes=59)), "state": "Tokenizing"}
    step(r, [pod], timedelta(minutes=59, seconds=30))
    assert r["status"]["phase"] == "Running"
    assert cond(r, "Idle")["status"] == "False" and cond(r, "Idle")["reason"] == "Preparing"
    r["status"]["progress"]["heartbeatTime"] = iso(T0 + timedelta(hours=2, minutes=1))
    step(r, [pod], timedelta(hours=2, minutes=1))
    assert r["status"]["phase"] == "IdleStopped"
    assert cond(r, "Idle")["reason"] == "PreparationTooLong"


def test_plateau_stops_with_the_final_gates_decision() -> None:
    gate = {"name": "loss", "at": {"step": 10}, "require": {"maxValidationLoss": 4.0}}
    r = run(plateau={"evaluations": 2}, gates=[gate], idle={"timeout": "1000h"})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    t = timedelta(minutes=1)
    for evaluated, loss in ((0, 4.2), (10, 3.5), (20, 3.6)):
        r["status"]["progress"] = progress(
            evaluated, 1000, T0 + t, evaluatedStep=evaluated, validationLoss=loss, baselineValidationLoss=4.2
        )
        step(r, [pod], t)
        t += timedelta(minutes=1)
        assert r["status"]["phase"] == "Running"
    assert r["status"]["evaluations"]["sinceBest"] == 1
    r["status"]["progress"] = progress(30, 1000, T0 + t, evaluatedStep=30, validationLoss=3.7)
    step(r, [pod], t)
    assert r["status"]["phase"] == "Stopped"
    assert r["status"]["stop"]["reason"] == "Plateau"
    assert r["status"]["decision"] == "GO"  # 3.7 is under the gate's 4.0
    assert r["status"]["evaluations"]["bestStep"] == 10


def test_finalizer_kept_while_pod_runs() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    assert POD_FINALIZER in pod["metadata"]["finalizers"]
    assert step(r, [pod], timedelta(minutes=1)).release_finalizers == []


def test_status_changed_rate_limits_cost_only_updates() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    step(r, [pod], timedelta(minutes=1))
    old = dict(r["status"])
    new_plan = plan(
        Observed(
            run=r,
            pods=[pod],
            nodes=NODES,
            missing_nodes=set(),
            prices=PriceTable(),
            now=T0 + timedelta(minutes=1, seconds=5),
        ),
        SETTINGS,
    )
    assert not status_changed(old, new_plan.status, 30.0, T0 + timedelta(minutes=1, seconds=5))
    assert status_changed(old, new_plan.status, 30.0, T0 + timedelta(minutes=2))
    TrainingRunStatus.model_validate(new_plan.status)


def test_a_new_runs_first_status_waits_for_its_pod_to_be_placed() -> None:
    r = run()
    first = step(r, [], timedelta(0))
    # The first pass created the pod: its status may wait up to the hold from the pod's creation.
    assert first_write_hold({}, first, 3.0, T0) == 3.0
    assert first_write_hold({}, first, 3.0, T0 + timedelta(seconds=2)) == 1.0
    assert first_write_hold({}, first, 3.0, T0 + timedelta(seconds=3)) is None
    assert first_write_hold({}, first, 0.0, T0) is None  # hold off: written at once
    # Planned again from the held status once the pod is bound: nothing more to wait for, and
    # the one write says both (the pod and its node).
    placed = step(r, [waiting(pod_for(r), "ContainerCreating", node_name="spot-1")], timedelta(seconds=1))
    assert first_write_hold({}, placed, 3.0, T0 + timedelta(seconds=1)) is None
    assert placed.status["pod"]["nodeName"] == "spot-1"
    assert [c["type"] for c in placed.status["conditions"] if c["status"] == "True"] == [
        "Accepted",
        "PodScheduled",
    ]


def test_only_the_very_first_status_is_ever_held() -> None:
    r = run()
    step(r, [], timedelta(0))
    written = dict(r["status"])
    # Anything already written (a pod or a phase): every later status goes out at once, an
    # interruption's next pod included.
    again = step(r, [], timedelta(seconds=1))
    assert first_write_hold(written, again, 3.0, T0 + timedelta(seconds=1)) is None
    assert first_write_hold({"phase": "Pending"}, again, 3.0, T0 + timedelta(seconds=1)) is None
    # A pass that stops a pod, releases a finalizer, cleans up or deletes is never held: its
    # status is what makes those safe.
    for side in (
        {"stop_pods": [("demo-0", "Deleting")]},
        {"release_finalizers": ["demo-0"]},
        {"cleanup": [("Pod", "demo-0")]},
        {"delete_run": True},
    ):
        busy = Plan(status=again.status, **side)
        assert first_write_hold({}, busy, 3.0, T0) is None, side
    # A refused create (no pod) or an invalid spec (no pod) is written at once.
    assert first_write_hold({}, refused(again, "Forbidden", "no", 1, T0), 3.0, T0) is None
    bad = run()
    bad["spec"]["budget"] = {"maxUSD": "lots"}
    assert first_write_hold({}, step(bad, [], timedelta(0)), 3.0, T0) is None


def test_exit_zero_after_sigterm_from_outside_is_an_interruption_not_success() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = progress(40, 100, T0 + timedelta(minutes=9))
    pod = terminated(pod, 0, T0 + timedelta(minutes=10))  # checkpointed on SIGTERM, exit 0
    pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(minutes=10))
    step(r, [pod], timedelta(minutes=10))
    assert r["status"]["phase"] == "Pending"
    assert r["status"]["interruptions"] == 1


def test_exit_zero_while_deleted_after_training_completed_is_success() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = {**progress(100, 100, T0 + timedelta(minutes=9)), "state": "Completed"}
    pod = terminated(pod, 0, T0 + timedelta(minutes=10))
    pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(minutes=10))
    step(r, [pod], timedelta(minutes=10))
    assert r["status"]["phase"] == "Succeeded"
    assert r["status"]["interruptions"] == 0


def test_terminating_pod_whose_kubelet_is_gone_counts_after_the_patience() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(minutes=10))
    step(r, [pod], timedelta(minutes=10))
    assert r["status"]["interruptions"] == 0
    step(r, [pod], timedelta(minutes=10, seconds=45))
    assert r["status"]["interruptions"] == 1
    seg = r["status"]["cost"]["segments"][0]
    assert seg["end"] == iso(T0 + timedelta(minutes=10))  # billed up to the deletion deadline


def test_merge_patch_removes_what_the_plan_dropped_at_any_depth() -> None:
    old = {
        "phase": "Running",
        "control": {"evaluationRequest": {"id": "g"}, "stopReport": {"id": "s"}},
        "x": 1,
    }
    new = {"phase": "Running", "control": {"stopReport": {"id": "s"}}}
    body = merge_patch(old, new)
    assert body == {
        "phase": "Running",
        "control": {"stopReport": {"id": "s"}, "evaluationRequest": None},
        "x": None,
    }

    # Applying it as RFC 7386 does gives ``new``.
    def apply(target: dict, patch: dict) -> dict:
        out = dict(target)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = apply(out[k], v)
            else:
                out[k] = v
        return out

    assert apply(old, body) == new


def test_pods_the_run_does_not_control_are_never_touched_or_billed() -> None:
    r = run()
    step(r, [], timedelta(0))
    ours = running(pod_for(r), "spot-1", T0)
    # Someone else's pod with our labels and a name of the next incarnation.
    foreign = running(pod_for(r, incarnation=1), "spot-1", T0)
    foreign["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    foreign["metadata"]["uid"] = "foreign-uid"
    ours["metadata"]["uid"] = "our-uid"
    p = step(r, [ours, foreign], timedelta(hours=1))
    assert p.stop_pods == []
    assert [s["pod"] for s in r["status"]["cost"]["segments"]] == ["demo-0"]
    assert r["status"]["pod"]["uid"] == "our-uid"


def test_a_stop_names_the_uid_of_the_pod_it_saw() -> None:
    r = run(budget={"maxUSD": 0.1})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    pod["metadata"]["uid"] = "uid-0"
    p = step(r, [pod], timedelta(hours=1))
    assert ("demo-0", "BudgetExceeded") in p.stop_pods
    assert p.uids["demo-0"] == "uid-0"


def test_tampering_is_said_and_planned_from_the_restored_status() -> None:
    r = run()
    step(r, [], timedelta(0))
    obs = Observed(
        run=r, pods=[], nodes=NODES, missing_nodes=set(), prices=PriceTable(), now=T0 + timedelta(seconds=5)
    )
    obs.tampered = ["cost", "phase"]
    p = plan(obs, SETTINGS)
    tampered = next(c for c in p.status["conditions"] if c["type"] == "Tampered")
    assert tampered["status"] == "True" and tampered["reason"] == "StatusRewritten"
    assert "status.cost, status.phase" in tampered["message"]
    assert [e.reason for e in p.events if e.type == "Warning"] == ["StatusTampered"]


def test_a_run_being_deleted_winds_down_without_counting_interruptions() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    step(r, [pod], timedelta(minutes=5))
    r["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(minutes=6))
    pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(minutes=6))
    gone = terminated(pod, 143, T0 + timedelta(minutes=6, seconds=10))
    p = step(r, [gone], timedelta(minutes=7))
    assert r["status"]["interruptions"] == 0
    assert p.create == []
    assert p.release_finalizers == ["demo-0"]


def test_namespace_deletion_is_not_an_interruption() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(minutes=6))
    gone = terminated(pod, 143, T0 + timedelta(minutes=6, seconds=10))
    obs = Observed(
        run=r,
        pods=[gone],
        nodes=NODES,
        missing_nodes=set(),
        prices=PriceTable(),
        now=T0 + timedelta(minutes=7),
        namespace_terminating=True,
    )
    p = plan(obs, SETTINGS)
    assert p.status.get("interruptions", 0) == 0 and p.create == []


def test_changed_resources_restart_the_pod_from_its_checkpoint_not_an_interruption() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)
    step(r, [pod], timedelta(minutes=5))
    r["spec"]["resources"]["instanceTypes"] = ["g4dn.xlarge", "g5.xlarge"]
    r["metadata"]["generation"] = 2
    p = step(r, [pod], timedelta(minutes=6))
    assert ("demo-0", "SpecChanged") in p.stop_pods
    assert [e.reason for e in p.events] == ["SpecChanged"]
    stopped = terminated(pod, 0, T0 + timedelta(minutes=7), phase="Failed")
    stopped["metadata"]["annotations"][ANNOTATION_STOP_REASON] = "SpecChanged"
    step(r, [stopped], timedelta(minutes=7))
    p = step(r, [stopped], timedelta(minutes=7, seconds=2))
    created = [o for o in p.create if o["kind"] == "Pod"]
    assert [o["metadata"]["name"] for o in created] == ["demo-1"]
    terms = created[0]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert "g5.xlarge" in terms["nodeSelectorTerms"][0]["matchExpressions"][1]["values"]
    assert r["status"]["interruptions"] == 0 and r["status"]["failures"] == 0


def test_a_refused_create_is_a_condition_and_is_not_retried_hot() -> None:
    r = run()
    p = step(r, [], timedelta(0))
    blocked = refused(p, "NameConflict", "ServiceAccount ml/demo-trainer already exists", 1, T0)
    r["status"] = blocked.status
    assert blocked.requeue_after == 300.0
    assert [e.reason for e in blocked.events] == ["NameConflict"]
    assert cond(r, "Accepted")["status"] == "False" and cond(r, "Accepted")["reason"] == "NameConflict"
    assert step(r, [], timedelta(seconds=30)).create == []  # same spec: wait
    assert cond(r, "Accepted")["reason"] == "NameConflict"
    r["metadata"]["generation"] = 2  # the user changed something: try again at once
    assert [o["kind"] for o in step(r, [], timedelta(seconds=31)).create][-1] == "Pod"
    r["status"] = refused(step(r, [], timedelta(seconds=32)), "CreateFailed", "quota", 2, T0).status
    assert step(r, [], timedelta(seconds=299)).create == []
    assert step(r, [], timedelta(seconds=301)).create != []  # ... or after the wait


def test_the_next_pod_verifies_its_own_checkpoint_or_starts_from_the_named_one() -> None:
    r = run(resumeFrom="s3://other/run/checkpoints/step-000000100/manifest.json")
    p = step(r, [], timedelta(0))
    env = {e["name"]: e.get("value") for e in p.create[-1]["spec"]["containers"][0]["env"]}
    assert env["FERMATA_RESUME_FROM"] == "s3://other/run/checkpoints/step-000000100/manifest.json"
    assert env["FERMATA_RESUME_EXPLICIT"] == "1"
    # Once the run has a checkpoint of its own, that one wins, with its digest to verify.
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["lastCheckpoint"] = {
        "uri": "s3://ml-runs/demo/checkpoints/step-000000020/manifest.json",
        "step": 20,
        "digest": "sha256:0123",
        "time": iso(T0 + timedelta(minutes=5)),
    }
    gone = terminated(pod, 137, T0 + timedelta(minutes=6), reason="OOMKilled")
    step(r, [gone], timedelta(minutes=6))
    p = step(r, [gone], timedelta(hours=1))
    env = {e["name"]: e.get("value") for e in p.create[-1]["spec"]["containers"][0]["env"]}
    assert env["FERMATA_RESUME_FROM"].endswith("step-000000020/manifest.json")
    assert env["FERMATA_RESUME_DIGEST"] == "sha256:0123"
    assert "FERMATA_RESUME_EXPLICIT" not in env


def test_a_pod_seen_unstarted_is_released_only_if_a_fresh_read_agrees() -> None:
    r = run()
    step(r, [], timedelta(0))
    pod = pod_for(r)
    pod["spec"]["nodeName"] = "spot-1"  # placed, and (as far as this view knows) never started
    pod["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(seconds=5))
    # Its kubelet may still start it: keep it while it is being deleted ...
    assert step(r, [pod], timedelta(seconds=10)).release_finalizers == []
    # ... until it cannot start any more (past the deletion deadline and the patience).
    p = step(r, [pod], timedelta(seconds=40))
    assert "demo-0" in p.release_finalizers and p.release_if_unstarted == {"demo-0"}
    started = running(pod_for(r), "spot-1", T0)
    started["metadata"]["deletionTimestamp"] = iso(T0 + timedelta(seconds=5))
    ended = terminated(started, 0, T0 + timedelta(seconds=6), phase="Failed")
    p = step(run(), [ended], timedelta(seconds=10))
    assert "demo-0" in p.release_finalizers and p.release_if_unstarted == set()  # billed: no re-check


def test_a_checkpoint_that_nearly_fills_the_grace_period_raises_checkpoint_at_risk() -> None:
    r = run(resources={"terminationGracePeriodSeconds": 150})
    step(r, [], timedelta(0))
    pod = running(pod_for(r), "spot-1", T0)

    def checkpoint(at_step: int, seconds: float) -> None:
        at = T0 + timedelta(minutes=at_step // 10 - 10)
        r["status"]["progress"] = progress(at_step, 1000, at)
        r["status"]["lastCheckpoint"] = {
            "uri": f"s3://ml-runs/demo/checkpoints/step-{at_step:09d}/manifest.json",
            "step": at_step,
            "digest": "sha256:0123",
            "time": iso(at),
            "durationSeconds": seconds,
            "sizeBytes": 5_040_000_000,
        }

    checkpoint(400, 131.0)
    p = step(r, [pod], timedelta(minutes=30))
    c = cond(r, "CheckpointAtRisk")
    assert c["status"] == "True" and c["reason"] == "CheckpointNearGracePeriod"
    assert "took 131.0 s of the 150 s grace period (87%)" in c["message"]
    assert [e.reason for e in p.events if e.type == "Warning"] == ["CheckpointAtRisk"]
    assert r["status"]["phase"] == "Running" and not p.stop_pods  # a warning, not a stop
    # still slow: the condition stays, no second Event
    checkpoint(500, 140.0)
    p = step(r, [pod], timedelta(minutes=40))
    assert cond(r, "CheckpointAtRisk")["status"] == "True"
    assert all(e.reason != "CheckpointAtRisk" for e in p.events)
    # a fast checkpoint again lifts it
    checkpoint(600, 25.0)
    step(r, [pod], timedelta(minutes=50))
    assert r["status"]["phase"] == "Running"
    c = cond(r, "CheckpointAtRisk")
    assert c["status"] == "False" and c["reason"] == "WithinGracePeriod"
    assert c["lastTransitionTime"] == iso(T0 + timedelta(minutes=50))
