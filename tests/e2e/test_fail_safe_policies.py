"""The rewritten planner's policies, end to end against the real API server and operator.

Unknown prices (no pod), the GPU count in the projection and ETA, gates that wait for an
evaluation at or after their milestone, baseline-relative gates, plateau early stopping, the
deadline, and stopping on a projected overrun. The test plays the trainer: it writes
``status.progress`` exactly as the trainer does (server-side apply on the status subresource
through the trainer's own ``KubernetesStatusReporter``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from fermata_api import RunRef, TrainerProgress, TrainerState, TrainerStatus, parse_time
from fermata_dev.kubelet import SPOT_TAINT, LocalKubelet, NodeSpec
from fermata_trainer.reporter import KubernetesStatusReporter
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for

pytestmark = pytest.mark.cluster

#: $36/h: 1 cent per second.
CENT_PER_SECOND = 36.0


def price(instance_type: str, hourly: float = CENT_PER_SECOND, capacity: str = "spot") -> dict[str, Any]:
    return {"instanceType": instance_type, "capacityType": capacity, "hourlyUSD": hourly}


@pytest.fixture
def op(operator_factory: Callable[..., OperatorProcess], restricted_namespace: str) -> OperatorProcess:
    """The operator, writing running totals (cost, projection, ETA) at most every second."""
    return operator_factory(restricted_namespace, FERMATA_COST_WRITE_SECONDS="1")


def report(
    runs: Runs,
    name: str,
    step: int,
    *,
    pod: str | None = None,
    total: int = 1000,
    state: TrainerState = TrainerState.training,
    **extra: Any,
) -> dict[str, Any]:
    """Report as the trainer does (SSA on status, field manager fermata-trainer)."""
    reporter = KubernetesStatusReporter(RunRef(name=name, namespace=runs.ns), api_client=runs.api)
    progress = TrainerProgress(
        state=state,
        heartbeat_time=datetime.now(UTC),
        pod_name=pod or f"{name}-0",
        step=step,
        total_steps=total,
        gpu_utilization=0.9,
        **extra,
    )
    return reporter.apply(TrainerStatus(progress=progress))


def running(runs: Runs, name: str, timeout: float = 60) -> dict[str, Any]:
    pod = f"{name}-0"
    return wait_for(
        lambda: (s := runs.status(name)).get("phase") == "Running"
        and (s.get("pod") or {}).get("name") == pod
        and s,
        timeout=timeout,
        what=f"{name} Running on {pod}",
    )


def phase(runs: Runs, name: str, want: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(
        lambda: (s := runs.status(name)).get("phase") == want and s, timeout=timeout, what=f"{name} {want}"
    )


def seconds_between(a: str, b: str) -> float:
    start, end = parse_time(a), parse_time(b)
    assert start is not None and end is not None
    return (end - start).total_seconds()


# ----------------------------------------------------------------------------- 1. unknown price


def test_an_unpriced_instance_type_gets_no_pod_until_a_price_is_added(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("fake", spec(resources={"instanceTypes": ["x9.fake"]}))
    accepted = wait_for(
        lambda: (c := runs.condition("fake", "Accepted")) and c["status"] == "False" and c,
        timeout=20,
        what="Accepted=False",
    )
    assert accepted["reason"] == "PriceUnknown"
    msg = accepted["message"]
    assert "x9.fake/spot" in msg and "spec.budget.prices" in msg and "price table" in msg, msg
    assert runs.status("fake")["phase"] == "Pending"
    # Three resyncs later: still no pod, and the Warning was posted once, not on every pass.
    for _ in range(3):
        assert runs.pods("fake") == []
        time.sleep(2)
    events = [e for e in runs.events("fake") if e.reason == "PriceUnknown"]
    assert len(events) == 1, [(e.reason, e.message) for e in events]
    assert events[0].type == "Warning" and "x9.fake/spot" in events[0].message
    assert "PodCreated" not in {e.reason for e in runs.events("fake")}

    runs.patch_spec("fake", {"budget": {"maxUSD": 600, "prices": [price("x9.fake", 1.0)]}})
    wait_for(lambda: [p.metadata.name for p in runs.pods("fake")] == ["fake-0"], timeout=20, what="pod")
    accepted = wait_for(
        lambda: (c := runs.condition("fake", "Accepted")) and c["status"] == "True" and c,
        timeout=20,
        what="Accepted=True",
    )
    assert accepted["reason"] != "PriceUnknown"
    # No node has x9.fake: the pod waits for capacity, but it exists.
    assert runs.status("fake")["phase"] == "Pending"


# ----------------------------------------------------------------------------- 2. gpus in the ETA


def test_the_projection_and_eta_count_every_gpu(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    # The default nodes carry one GPU each: add a 4-GPU spot node for the gpus: 4 run.
    kubelet.add_node(
        NodeSpec(
            "spot-4gpu",
            "g4dn.12xlarge",
            "spot",
            "us-east-1c",
            gpus=4,
            cpu="48",
            memory="192Gi",
            taints=(SPOT_TAINT,),
        )
    )
    for name, gpus, itype in (("one", 1, "g4dn.xlarge"), ("four", 4, "g4dn.12xlarge")):
        runs.create(
            name,
            spec(
                resources={"gpus": gpus, "instanceTypes": [itype]},
                budget={"maxUSD": 600, "prices": [price(itype)]},  # the same $36/h for both
            ),
        )
    for name in ("one", "four"):
        running(runs, name)
    assert runs.status("four")["pod"]["nodeName"] == "spot-4gpu"
    # Same throughput and progress: 900 steps left, 8 samples a step per GPU, 8 samples/s.
    for name in ("one", "four"):
        report(runs, name, 100, total=1000, samples_per_second=8.0)
    expected = {"one": 900.0, "four": 3600.0}
    st = {
        name: wait_for(
            lambda name=name: (s := runs.status(name)).get("eta")
            and s["eta"]["remainingSeconds"] == expected[name]
            and s,
            timeout=20,
            what=f"{name}: eta.remainingSeconds == {expected[name]}",
        )
        for name in ("one", "four")
    }
    ahead = {}
    for name in ("one", "four"):
        cost = st[name]["cost"]
        assert cost["hourlyRateUSD"] == CENT_PER_SECOND, cost
        ahead[name] = cost["projectedTotalUSD"] - cost["accruedUSD"]
        # $36/h over the remaining seconds.
        assert ahead[name] == pytest.approx(expected[name] / 100.0, abs=2e-4), cost
        assert st[name]["eta"]["remainingCostUSD"] == pytest.approx(expected[name] / 100.0, abs=1e-4)
    assert ahead["four"] == pytest.approx(4 * ahead["one"], rel=1e-4)
    assert st["four"]["eta"]["remainingSeconds"] == 4 * st["one"]["eta"]["remainingSeconds"]
    assert st["four"]["eta"]["remaining"] == "1h" and st["one"]["eta"]["remaining"] == "15m"


# ----------------------------------------------------------------------------- 3. a gate waits


def test_a_step_gate_waits_for_an_evaluation_at_or_after_its_milestone(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    gate = {"name": "step-100", "at": {"step": 100}, "require": {"maxValidationLoss": 3.5}}
    runs.create("waits", spec(gates=[gate]))
    running(runs, "waits")
    # Past the milestone, but the latest evaluation is the step-0 baseline (whose loss would pass).
    report(runs, "waits", 120, evaluated_step=0, validation_loss=3.0, baseline_validation_loss=4.0)
    st = wait_for(
        lambda: (s := runs.status("waits")).get("pendingGates") and s, timeout=20, what="pendingGates"
    )
    assert [(g["name"], g["dueStep"]) for g in st["pendingGates"]] == [("step-100", 100)]
    request = st["control"]["evaluationRequest"]
    assert request["minStep"] == 100
    time.sleep(3)  # more than a resync: still waiting, nothing judged on the baseline
    st = runs.status("waits")
    assert not st.get("gates") and st.get("decision") is None, st.get("gates")
    assert st["phase"] == "Running"
    assert st["control"]["evaluationRequest"]["id"] == request["id"]  # the same request, not a new one

    report(
        runs,
        "waits",
        120,
        evaluated_step=120,
        validation_loss=3.0,
        baseline_validation_loss=4.0,
        evaluation_request_ack=request["id"],
    )
    st = wait_for(lambda: (s := runs.status("waits")).get("gates") and s, timeout=20, what="gate fired")
    outcome = st["gates"][0]
    assert outcome["name"] == "step-100" and outcome["decision"] == "GO", outcome
    assert outcome["evaluatedStep"] == 120
    assert outcome["evidence"]["validationLoss"] == 3.0
    assert st["decision"] == "GO" and st["phase"] == "Running"
    assert not st.get("pendingGates")
    # The request is answered and no gate waits: the planner withdraws it (GateResult.request is
    # None), and the stored status must say so. The status is written as a JSON merge patch, so a
    # key dropped *inside* status.control must be sent as null to be removed.
    deadline = time.monotonic() + 5  # a few resyncs: not just a write still in flight
    while "evaluationRequest" in (control := runs.status("waits").get("control") or {}):
        assert time.monotonic() < deadline, (
            "status.control.evaluationRequest outlived the gate it was for: the operator's merge "
            f"patch left the withdrawn request in place: control={control}"
        )
        time.sleep(0.5)
    assert "GateGo" in {e.reason for e in runs.events("waits")}


# ----------------------------------------------------------------------------- 4. relative gate


def test_a_gate_relative_to_the_baseline(runs: Runs, op: OperatorProcess, kubelet: LocalKubelet) -> None:
    gate = {"name": "better", "at": {"step": 100}, "require": {"minImprovementOverBaseline": 0.1}}
    # Baseline 4.0: GO needs ≤ 3.6; with the default 5% margin 3.8 (> 3.78) is still a fail.
    for name in ("meh", "good"):
        runs.create(name, spec(gates=[gate]))
    for name in ("meh", "good"):
        running(runs, name)
    for name, loss in (("meh", 3.8), ("good", 3.5)):
        report(runs, name, 100, evaluated_step=100, validation_loss=loss, baseline_validation_loss=4.0)

    meh = wait_for(lambda: (s := runs.status("meh")).get("gates") and s, timeout=20, what="meh judged")
    outcome = meh["gates"][0]
    assert outcome["decision"] == "NO-GO", outcome
    assert outcome["evidence"]["improvementOverBaseline"] == pytest.approx(0.05)
    assert outcome["evidence"]["baselineValidationLoss"] == 4.0
    assert "improvementOverBaseline" in outcome["reason"]
    meh = phase(runs, "meh", "Stopped")
    assert meh["decision"] == "NO-GO" and meh["stop"]["reason"] == "GateNoGo"
    # The trainer never acknowledges the stop request: SIGTERM after the 3 s timeout.
    wait_for(lambda: runs.pods("meh") == [], timeout=30, what="NO-GO stops the pod")

    good = wait_for(lambda: (s := runs.status("good")).get("gates") and s, timeout=20, what="good judged")
    outcome = good["gates"][0]
    assert outcome["decision"] == "GO", outcome
    assert outcome["evidence"]["improvementOverBaseline"] == pytest.approx(0.125)
    assert good["phase"] == "Running" and good["decision"] == "GO"
    assert [p.metadata.name for p in runs.pods("good")] == ["good-0"]


# ----------------------------------------------------------------------------- 5. plateau


def test_plateau_stops_a_run_whose_loss_no_longer_improves(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    # A gate far ahead: the plateau's decision is every gate's thresholds on the final metrics.
    gate = {"name": "late", "at": {"step": 100000}, "require": {"maxValidationLoss": 3.6}}
    runs.create("flat", spec(plateau={"evaluations": 2}, gates=[gate]))
    running(runs, "flat")
    history = [(0, 4.0, 0), (100, 3.5, 0), (200, 3.6, 1), (300, 3.7, 2)]
    for step, loss, since_best in history:
        report(runs, "flat", step, evaluated_step=step, validation_loss=loss, baseline_validation_loss=4.0)
        st = wait_for(
            lambda step=step: (s := runs.status("flat")).get("evaluations")
            and s["evaluations"]["lastStep"] == step
            and s,
            timeout=20,
            what=f"evaluation at step {step} seen",
        )
        ev = st["evaluations"]
        assert ev["sinceBest"] == since_best, ev
        if step < 300:
            assert st["phase"] == "Running", (step, st.get("stop"))
    assert ev["count"] == 4 and ev["bestValidationLoss"] == 3.5 and ev["bestStep"] == 100
    st = phase(runs, "flat", "Stopped")
    assert st["stop"]["reason"] == "Plateau"
    # Final loss 3.7 misses maxValidationLoss 3.6 within the 5% margin.
    assert st["decision"] == "CONDITIONAL-GO", st.get("decisionReason")
    final = st["gates"][-1]
    assert final["name"] == "final" and final["decision"] == "CONDITIONAL-GO"
    # The trainer is alive: it is asked to checkpoint and stop by itself. Play it doing so.
    req = wait_for(
        lambda: (runs.status("flat").get("control") or {}).get("checkpointRequest"),
        timeout=10,
        what="stop request",
    )
    assert req["stop"] is True and req["id"].startswith("flat-0-stop")
    assert runs.status("flat")["control"]["stopReport"]["reason"] == "Plateau"
    report(runs, "flat", 300, state=TrainerState.stopped, checkpoint_request_ack=req["id"])
    kubelet.set_succeeded(runs.ns, "flat-0")
    wait_for(
        lambda: all(p.status.phase == "Succeeded" for p in runs.pods("flat")),
        timeout=20,
        what="trainer exited by itself",
    )
    st = runs.status("flat")
    assert st["phase"] == "Stopped" and st["stop"]["reason"] == "Plateau"


# ----------------------------------------------------------------------------- 6. deadline


def test_the_deadline_stops_the_run(runs: Runs, op: OperatorProcess, kubelet: LocalKubelet) -> None:
    runs.create("late", spec(deadline="20s"))
    running(runs, "late")
    report(runs, "late", 5)
    time.sleep(10)
    assert runs.status("late")["phase"] == "Running"
    st = phase(runs, "late", "Stopped", timeout=30)
    assert st["stop"]["reason"] == "DeadlineExceeded"
    assert st["decision"] == "NO-GO"
    waited = seconds_between(st["startTime"], st["stop"]["time"])
    assert 20 <= waited <= 26, waited
    wait_for(lambda: runs.pods("late") == [], timeout=30, what="deadline stops the pod")
    assert "DeadlineExceeded" in {e.reason for e in runs.events("late")}


# ----------------------------------------------------------------------------- 7. projected overrun


def test_a_projected_overrun_stops_the_run_before_the_budget_is_spent(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create(
        "slow",
        spec(budget={"maxUSD": 1.0, "stopOnProjectedOverrun": True, "prices": [price("g4dn.xlarge")]}),
    )
    running(runs, "slow")
    time.sleep(2)
    assert runs.status("slow")["phase"] == "Running"  # no throughput yet: no projection, no stop
    # 990 steps left × 8 samples at 1 sample/s = 7920 s at 1 cent/s: ~$79 against a $1 budget.
    report(runs, "slow", 10, total=1000, samples_per_second=1.0)
    st = phase(runs, "slow", "BudgetExceeded", timeout=20)
    cost = st["cost"]
    assert cost["accruedUSD"] < 1.0, cost
    assert cost["projectedTotalUSD"] > 1.0, cost
    assert cost["projectedTotalUSD"] == pytest.approx(cost["accruedUSD"] + 79.2, abs=1e-3)
    exceeded = runs.condition("slow", "BudgetExceeded")
    assert exceeded is not None and exceeded["status"] == "True"
    assert exceeded["reason"] == "ProjectedOverrun", exceeded
    assert st["decision"] == "NO-GO" and st["stop"]["reason"] == "ProjectedOverrun"
    wait_for(lambda: runs.pods("slow") == [], timeout=30, what="overrun stops the pod")
    assert runs.status("slow")["cost"]["accruedUSD"] < 1.0
