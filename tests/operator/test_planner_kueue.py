"""The planner with Kueue: labels copied to the pod, Queued while gated (no cost, no idle clock),
Running once admitted, and a Kueue eviction counted as an interruption."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fermata_api.meta import KUEUE_ADMISSION_GATE, KUEUE_QUEUE_LABEL, KUEUE_TERMINATION_CONDITION
from tests.operator.factories import T0, deleting, pod_for, run, running, terminated
from tests.operator.test_planner import cond, step


def queued_run() -> dict[str, Any]:
    r = run(idle={"timeout": "1m"}, spot={"backoffSeconds": 1})
    r["metadata"]["labels"] = {KUEUE_QUEUE_LABEL: "team-a", "unrelated": "x"}
    return r


def gate(p: dict[str, Any]) -> dict[str, Any]:
    """What Kueue's pod webhook does at creation."""
    p["spec"]["schedulingGates"] = [{"name": KUEUE_ADMISSION_GATE}]
    p["metadata"]["labels"]["kueue.x-k8s.io/managed"] = "true"
    return p


def test_the_pod_carries_the_queue_label_and_no_gate_of_ours() -> None:
    r = queued_run()
    pod = next(o for o in step(r, [], timedelta(0)).create if o["kind"] == "Pod")
    assert pod["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert "unrelated" not in pod["metadata"]["labels"]
    assert "schedulingGates" not in pod["spec"]
    plain = next(o for o in step(run(), [], timedelta(0)).create if o["kind"] == "Pod")
    assert KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]


def test_queued_costs_nothing_and_is_not_idle_then_admission_runs_it() -> None:
    r = queued_run()
    step(r, [], timedelta(0))
    pod = gate(pod_for(r))
    step(r, [pod], timedelta(seconds=5))
    p = step(r, [pod], timedelta(hours=3))
    st = r["status"]
    assert st["phase"] == "Pending" and not p.stop_pods
    queued = cond(r, "Queued")
    assert queued["status"] == "True" and KUEUE_ADMISSION_GATE in queued["message"]
    assert st["cost"]["accruedUSD"] == 0
    assert "waitingForCapacitySince" not in st
    assert not any(c["type"] in {"WaitingForCapacity", "Idle"} for c in st["conditions"])
    assert sum(e.reason == "Queued" for e in p.events) == 0  # said once, on the first pass
    # Admitted: Kueue removes the gate; the pod is placed and starts.
    started = T0 + timedelta(hours=3, seconds=10)
    pod = running(pod_for(r), "spot-1", started)
    step(r, [pod], timedelta(hours=3, seconds=20))
    assert r["status"]["phase"] == "Running"
    assert cond(r, "Queued")["status"] == "False"
    assert cond(r, "Idle")["status"] == "False"  # its clock starts with the container
    # Kueue preempts it: TerminationTarget, then the pod is deleted; the trainer checkpoints.
    pod["status"]["conditions"].append(
        {"type": KUEUE_TERMINATION_CONDITION, "status": "True", "reason": "StoppedByKueue"}
    )
    pod = deleting(pod, T0 + timedelta(hours=4))
    pod = terminated(pod, 0, T0 + timedelta(hours=4))
    pod["status"]["conditions"].append(
        {"type": KUEUE_TERMINATION_CONDITION, "status": "True", "reason": "StoppedByKueue"}
    )
    step(r, [pod], timedelta(hours=4, seconds=1))
    st = r["status"]
    assert (st["interruptions"], st["failures"], st["incarnation"]) == (1, 0, 1)
    assert st["lastInterruption"].startswith("KueueStoppedByKueue")
    p = step(r, [pod], timedelta(hours=4, seconds=5))
    new = [o for o in p.create if o["kind"] == "Pod"]
    assert [o["metadata"]["labels"][KUEUE_QUEUE_LABEL] for o in new] == ["team-a"]
