"""Budget, idle, spot recovery and gates, enforced by the operator against the real API server.

The trainer's reports are written exactly as the trainer writes them — server-side apply of
``TrainerStatus`` on the status subresource with the ``fermata-trainer`` field manager, through
the trainer's own ``KubernetesStatusReporter`` — so these tests exercise the real contract.
Prices are overridden per run (``spec.budget.prices``) to make money move in seconds.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from fermata_api import CheckpointRef, RunRef, TrainerProgress, TrainerState, TrainerStatus
from fermata_dev.kubelet import LocalKubelet
from fermata_trainer.reporter import KubernetesStatusReporter
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for

pytestmark = pytest.mark.cluster

#: $36/h = 1 cent per second on g4dn.xlarge, both capacity types.
FAST_PRICES = [
    {"instanceType": "g4dn.xlarge", "capacityType": "spot", "hourlyUSD": 36.0},
    {"instanceType": "g4dn.xlarge", "capacityType": "on-demand", "hourlyUSD": 72.0},
    {"instanceType": "g5.xlarge", "capacityType": "on-demand", "hourlyUSD": 72.0},
]


def report(
    runs: Runs, name: str, step: int, pod: str, *, total: int = 1000, gpu: float | None = 0.9, **extra: Any
) -> dict[str, Any]:
    """Report as the trainer does (SSA on status, field manager fermata-trainer)."""
    reporter = KubernetesStatusReporter(RunRef(name=name, namespace=runs.ns), api_client=runs.api)
    checkpoint = extra.pop("checkpoint", None)
    status = TrainerStatus(
        progress=TrainerProgress(
            state=TrainerState.training,
            heartbeat_time=datetime.now(UTC),
            pod_name=pod,
            step=step,
            total_steps=total,
            gpu_utilization=gpu,
            **extra,
        ),
        last_checkpoint=checkpoint,
    )
    return reporter.apply(status)


def running(runs: Runs, name: str, pod: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(
        lambda: (s := runs.status(name)).get("phase") == "Running"
        and (s.get("pod") or {}).get("name") == pod
        and s,
        timeout=timeout,
        what=f"{name} Running on {pod}",
    )


def test_budget_crossed_mid_run_stops_the_pod_within_the_stated_overshoot(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    # $36/h spot: 1 cent/s. Budget 10 cents: crossed 10 s after the pod starts.
    runs.create("budget", spec(budget={"maxUSD": 0.10, "warnAtFraction": 0.5, "prices": FAST_PRICES}))
    st = running(runs, "budget", "budget-0")
    report(runs, "budget", 5, "budget-0")
    wait_for(
        lambda: (c := runs.condition("budget", "BudgetWarning")) and c["status"] == "True",
        timeout=30,
        what="BudgetWarning",
    )
    st = wait_for(
        lambda: (s := runs.status("budget")).get("phase") == "BudgetExceeded" and s,
        timeout=40,
        what="BudgetExceeded",
    )
    assert st["decision"] == "NO-GO"
    assert "budget" in st["decisionReason"]
    wait_for(lambda: runs.pods("budget") == [], timeout=30, what="pod stopped and released")
    final = runs.status("budget")["cost"]
    # Overshoot bound (README): rate x (reconcile latency + checkpoint-request timeout + grace
    # period). Here: the reported trainer never answers, so it is SIGTERMed after the 3 s timeout
    # and the test kubelet stops it at once: 1 cent/s x (~1 s latency + 3 s + slack).
    overshoot = final["accruedUSD"] - 0.10
    assert 0 <= overshoot <= 0.01 * 8, final
    assert final["segments"][0]["end"] is not None
    reasons = {e.reason for e in runs.events("budget")}
    assert {"BudgetWarning", "BudgetExceeded"} <= reasons


def test_stale_heartbeat_stops_a_run_but_pending_is_not_idle(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    # One run that cannot be scheduled (no node has 8 GPUs): Pending, waiting, never idle.
    runs.create("waiting", spec(resources={"gpus": 8}, idle={"timeout": "3s"}))
    runs.create("stale", spec(idle={"timeout": "4s"}))
    running(runs, "stale", "stale-0")
    report(runs, "stale", 3, "stale-0")
    st = wait_for(
        lambda: (s := runs.status("stale")).get("phase") == "IdleStopped" and s,
        timeout=30,
        what="IdleStopped",
    )
    idle = runs.condition("stale", "Idle")
    assert idle is not None and idle["reason"] == "HeartbeatStale"
    assert st["decision"] == "NO-GO"
    wait_for(lambda: runs.pods("stale") == [], timeout=30, what="idle pod stopped")
    waiting = runs.status("waiting")
    assert waiting["phase"] == "Pending"
    cap = runs.condition("waiting", "WaitingForCapacity")
    assert cap is not None and cap["status"] == "True" and "Insufficient nvidia.com/gpu" in cap["message"]
    assert waiting.get("waitingForCapacitySince")
    assert runs.condition("waiting", "Idle") is None


def test_low_gpu_utilisation_stops_a_run(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("lowgpu", spec(idle={"timeout": "4s", "minGpuUtilization": 0.5}))
    running(runs, "lowgpu", "lowgpu-0")
    deadline = time.monotonic() + 30
    step = 1
    while time.monotonic() < deadline and runs.status("lowgpu").get("phase") == "Running":
        report(runs, "lowgpu", step, "lowgpu-0", gpu=0.05)  # heartbeats fresh, steps advance
        step += 1
        time.sleep(0.5)
    assert runs.status("lowgpu")["phase"] == "IdleStopped"
    idle = runs.condition("lowgpu", "Idle")
    assert idle is not None and idle["reason"] == "LowGpuUtilization"


@pytest.mark.parametrize("how", ["disruption-target", "node-taint", "node-deleted"])
def test_interruption_recreates_the_pod_with_the_resume_checkpoint_and_spares_the_failure_budget(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet, how: str
) -> None:
    runs.create(
        "spot", spec(failures={"maxRetries": 0}, spot={"backoffSeconds": 1, "fallbackToOnDemandAfter": 0})
    )
    st = running(runs, "spot", "spot-0")
    node = st["pod"]["nodeName"]
    ckpt = CheckpointRef(
        uri="s3://ml-runs/test/checkpoints/step-000000040/manifest.json",
        step=40,
        digest="sha256:" + "ab" * 32,
        time=datetime.now(UTC),
        reason="periodic",
    )
    report(runs, "spot", 41, "spot-0", checkpoint=ckpt)
    if how == "disruption-target":
        kubelet.add_disruption_target(runs.ns, "spot-0", reason="PreemptionByScheduler")
        kubelet.set_failed(runs.ns, "spot-0", exit_code=143, reason="Error")
    elif how == "node-taint":
        kubelet.taint_node(node, "aws-node-termination-handler/spot-itn", "true", "NoSchedule")
        # The operator asks for a checkpoint as soon as it sees the notice ...
        req = wait_for(
            lambda: ((runs.status("spot").get("control") or {}).get("checkpointRequest")),
            timeout=20,
            what="checkpoint request on the termination notice",
        )
        assert req["reason"] == "interruption"
        # ... then the node goes and takes the pod with it.
        kubelet.delete_node(node)
    else:
        kubelet.delete_node(node)
    pod = wait_for(
        lambda: any(p.metadata.name == "spot-1" for p in runs.pods("spot")),
        timeout=60,
        what="replacement pod",
    )
    assert pod
    new = runs.core.read_namespaced_pod("spot-1", runs.ns)
    env = {e.name: e.value for e in new.spec.containers[0].env}
    assert env["FERMATA_RESUME_FROM"] == ckpt.uri
    assert env["FERMATA_INCARNATION"] == "1"
    st = runs.status("spot")
    assert st["interruptions"] == 1 and st["failures"] == 0
    interrupted = runs.condition("spot", "Interrupted")
    assert interrupted is not None and interrupted["status"] == "True"
    running(runs, "spot", "spot-1")
    # Exactly one live trainer pod.
    live = [
        p
        for p in runs.pods("spot")
        if p.metadata.deletion_timestamp is None and p.status.phase not in ("Failed", "Succeeded")
    ]
    assert [p.metadata.name for p in live] == ["spot-1"]


def test_a_crash_uses_the_failure_budget(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    kubelet.set_mode("manual")
    runs.create("crashy", spec(failures={"maxRetries": 1, "backoffSeconds": 1}))
    wait_for(
        lambda: runs.core.read_namespaced_pod("crashy-0", runs.ns).spec.node_name, timeout=30, what="bound"
    )
    kubelet.set_running(runs.ns, "crashy-0")
    running(runs, "crashy", "crashy-0")
    kubelet.set_failed(runs.ns, "crashy-0", exit_code=1, reason="Error")
    wait_for(lambda: runs.status("crashy").get("failures") == 1, timeout=30, what="failure counted")
    assert runs.status("crashy")["interruptions"] == 0
    wait_for(
        lambda: any(p.metadata.name == "crashy-1" for p in runs.pods("crashy")), timeout=30, what="retry pod"
    )


def test_fallback_to_on_demand_after_n_interruptions(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create(
        "fallback", spec(spot={"maxInterruptions": 5, "fallbackToOnDemandAfter": 2, "backoffSeconds": 0})
    )
    for i in range(2):
        running(runs, "fallback", f"fallback-{i}")
        kubelet.evict(runs.ns, f"fallback-{i}")
        wait_for(
            lambda i=i: runs.status("fallback").get("interruptions") == i + 1,
            timeout=30,
            what=f"interruption {i + 1}",
        )
    st = running(runs, "fallback", "fallback-2")
    assert st["capacity"] == "on-demand"
    node = runs.core.read_node(st["pod"]["nodeName"])
    assert node.metadata.labels["karpenter.sh/capacity-type"] == "on-demand"
    assert "CapacityChanged" in {e.reason for e in runs.events("fallback")}


@pytest.mark.parametrize(
    ("val_loss", "authenticity", "decision", "phase"),
    [(3.1, 0.42, "GO", "Running"), (3.6, 0.41, "CONDITIONAL-GO", "Running"), (4.8, 0.12, "NO-GO", "Stopped")],
)
def test_gates_give_go_conditional_go_and_no_go(
    runs: Runs,
    operator: OperatorProcess,
    kubelet: LocalKubelet,
    val_loss: float,
    authenticity: float,
    decision: str,
    phase: str,
) -> None:
    gate = {
        "name": "week-5",
        "at": {"step": 100},
        "require": {"minAuthenticity": 0.35, "maxValidationLoss": 3.5, "maxCostUSD": 600},
    }
    runs.create("gated", spec(gates=[gate]))
    running(runs, "gated", "gated-0")
    report(
        runs, "gated", 99, "gated-0", validation_loss=val_loss, authenticity=authenticity, evaluated_step=99
    )
    time.sleep(3)
    assert not runs.status("gated").get("gates")
    # The evaluation the gate judges is the one at its milestone (step 100), not an older one.
    report(
        runs, "gated", 100, "gated-0", validation_loss=val_loss, authenticity=authenticity, evaluated_step=100
    )
    st = wait_for(
        lambda: (s := runs.status("gated")).get("decision") == decision and s, timeout=30, what=decision
    )
    outcome = st["gates"][0]
    assert outcome["name"] == "week-5" and outcome["decision"] == decision
    assert outcome["evaluatedStep"] == 100
    assert (
        outcome["evidence"]["validationLoss"] == val_loss and outcome["evidence"]["minAuthenticity"] == 0.35
    )
    wait_for(lambda: runs.status("gated")["phase"] == phase, timeout=30, what=phase)
    if decision == "NO-GO":
        wait_for(lambda: runs.pods("gated") == [], timeout=30, what="NO-GO stops the pod")


def test_operator_restart_loses_no_cost_and_changes_no_outcome(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("ledger", spec(budget={"maxUSD": 100, "prices": FAST_PRICES}))
    running(runs, "ledger", "ledger-0")
    report(runs, "ledger", 10, "ledger-0")
    operator.kill()
    time.sleep(4)  # spend continues while the operator is down
    # The pod ends while nobody watches.
    kubelet.evict(runs.ns, "ledger-0")
    time.sleep(2)
    operator.start()
    st = wait_for(
        lambda: (s := runs.status("ledger")).get("interruptions") == 1 and s,
        timeout=40,
        what="interruption after restart",
    )
    seg = st["cost"]["segments"][0]
    assert seg["pod"] == "ledger-0" and seg["end"] is not None
    start = datetime.fromisoformat(seg["start"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(seg["end"].replace("Z", "+00:00"))
    assert seg["usd"] == pytest.approx((end - start).total_seconds() * 0.01, rel=1e-3)
    assert (end - start).total_seconds() >= 4  # the downtime is billed, not lost
    # Killing the operator again re-derives the same closed segment: nothing counted twice.
    operator.kill()
    operator.start()
    time.sleep(5)
    st2 = runs.status("ledger")
    closed = [s for s in st2["cost"]["segments"] if s["end"]]
    assert [s["pod"] for s in closed].count("ledger-0") == 1
    assert closed[0]["usd"] == seg["usd"]
    assert st2["interruptions"] == 1


def test_suspend_releases_the_gpu_and_resume_keeps_history(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("pause", spec(budget={"maxUSD": 100, "prices": FAST_PRICES}))
    running(runs, "pause", "pause-0")
    report(runs, "pause", 10, "pause-0")
    time.sleep(2)
    runs.patch_spec("pause", {"suspend": True})
    wait_for(lambda: runs.status("pause").get("phase") == "Suspended", timeout=30, what="Suspended")
    wait_for(lambda: runs.pods("pause") == [], timeout=30, what="GPU released")
    spent = wait_for(
        lambda: (s := runs.status("pause"))["cost"]["segments"][0].get("end") and s["cost"]["accruedUSD"],
        timeout=30,
    )
    time.sleep(3)
    assert runs.status("pause")["cost"]["accruedUSD"] == spent  # nothing accrues while suspended
    runs.patch_spec("pause", {"suspend": False})
    running(runs, "pause", "pause-1")
    st = runs.status("pause")
    assert st["cost"]["segments"][0]["pod"] == "pause-0"
    assert st["interruptions"] == 0 and st["failures"] == 0
