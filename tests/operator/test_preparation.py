"""The preparation phase (spec.preparation.mode Pod): its policy and the planner's sequencing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fermata_api import (
    IdleSpec,
    PreparationReport,
    PreparationState,
    TrainingRunSpec,
    TrainingRunStatus,
)
from fermata_operator import podspec
from fermata_operator.planner import Observed, Plan, first_write_hold, plan
from fermata_operator.policies import preparation
from fermata_operator.policies.pod_outcome import Kind, Outcome
from fermata_operator.policies.prices import DEFAULT_PRICES, PriceTable
from fermata_operator.settings import OperatorSettings
from tests.operator.factories import (
    T0,
    deleting,
    iso,
    node,
    pod_for,
    progress,
    run,
    running,
    terminated,
    with_condition,
)

SETTINGS = OperatorSettings()
NODES = {
    "spot-1": node("spot-1"),
    "cpu-1": node("cpu-1", capacity="on-demand", instance_type="m5.xlarge"),
}
POD_MODE = {"mode": "Pod", "resources": {"instanceTypes": ["m5.xlarge"]}}
TRAINER_OWNED = {"progress", "lastCheckpoint", "artifacts", "preparation"}


def step(r: dict[str, Any], pods: list[dict[str, Any]], at: timedelta) -> Plan:
    obs = Observed(run=r, pods=pods, nodes=NODES, missing_nodes=set(), prices=PriceTable(), now=T0 + at)
    result = plan(obs, SETTINGS)
    trainer = {k: v for k, v in (r.get("status") or {}).items() if k in TRAINER_OWNED}
    r["status"] = {**result.status, **trainer}
    return result


def cond(r: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in r["status"]["conditions"] if c["type"] == ctype)


def prep_pod(r: dict[str, Any], incarnation: int = 0) -> dict[str, Any]:
    s = TrainingRunSpec.model_validate(r["spec"])
    p = podspec.preparation_pod(r, s, SETTINGS, incarnation=incarnation)
    p["metadata"]["creationTimestamp"] = iso(T0)
    p["metadata"]["uid"] = f"prep-uid-{incarnation}"
    p["status"] = {"phase": "Pending"}
    return p


def report(state: str, at: timedelta, pod: str = "demo-prep-0", **extra: Any) -> dict[str, Any]:
    return {"state": state, "heartbeatTime": iso(T0 + at), "podName": pod, **extra}


def completed(pod: str = "demo-prep-0", at: timedelta = timedelta(minutes=10)) -> dict[str, Any]:
    return report(
        "Completed",
        at,
        pod,
        filesDone=40,
        filesTotal=40,
        tokenized=30,
        reused=10,
        manifestDigest="abc123",
        codesKey="k" * 32,
    )


# ----------------------------------------------------------------------------- the pure policy


def test_required_only_in_pod_mode_before_training_and_until_verified() -> None:
    spec = TrainingRunSpec.model_validate(run(preparation=POD_MODE)["spec"])
    assert preparation.required(spec, TrainingRunStatus())
    assert not preparation.required(spec, TrainingRunStatus.model_validate({"preparer": {"prepared": True}}))
    started = TrainingRunStatus.model_validate({"pod": {"name": "demo-0", "incarnation": 0}})
    assert not preparation.required(spec, started)  # a training pod exists: it prepares itself
    trainer = TrainingRunSpec.model_validate(run()["spec"])  # the factories' mode Trainer
    assert not preparation.required(trainer, TrainingRunStatus())


def test_success_is_verified_only_by_the_pods_own_completed_report() -> None:
    done = Outcome(Kind.succeeded, "Completed", "exit 0", 0, False, T0, T0 + timedelta(minutes=10))
    now = T0 + timedelta(minutes=10, seconds=1)
    ok = preparation.on_success(PreparationReport.model_validate(completed()), "demo-prep-0", done, now)
    assert ok.verified and ok.codes_key == "k" * 32 and ok.manifest_digest == "abc123"
    other = PreparationReport.model_validate(completed("demo-prep-1"))
    waiting = preparation.on_success(other, "demo-prep-0", done, now)
    assert not waiting.verified and waiting.wait  # its own report may still be on its way
    late = preparation.on_success(other, "demo-prep-0", done, now + timedelta(minutes=1))
    assert not late.verified and not late.wait and "without reporting a verified dataset" in late.message
    tokenizing = PreparationReport.model_validate(report("Tokenizing", timedelta(minutes=9)))
    assert not preparation.on_success(tokenizing, "demo-prep-0", done, now).verified


def test_preparation_idle_allowance_and_stale_heartbeat() -> None:
    spec = IdleSpec(timeout="10m", preparation_timeout="1h")
    fresh = PreparationReport(state=PreparationState.tokenizing, heartbeat_time=T0 + timedelta(minutes=50))
    v = preparation.idle(spec, fresh, T0, T0, T0 + timedelta(minutes=55))
    assert v.stop is None and v.wake_in is not None and v.wake_in <= 5 * 60
    long = preparation.idle(spec, fresh, T0, T0, T0 + timedelta(minutes=59, seconds=59))
    assert long.stop is None
    v = preparation.idle(spec, fresh, T0, T0, T0 + timedelta(hours=1))
    assert v.stop is not None and v.conditions[0].reason == "HeartbeatStale"
    recent = fresh.model_copy(update={"heartbeat_time": T0 + timedelta(minutes=59)})
    v = preparation.idle(spec, recent, T0 + timedelta(minutes=30), T0, T0 + timedelta(hours=1))
    assert v.stop is not None and v.conditions[0].reason == "PreparationTooLong"
    v = preparation.idle(spec, None, T0, T0, T0 + timedelta(minutes=10))
    assert v.stop is not None and v.conditions[0].reason == "HeartbeatStale"


def test_progress_message_says_files_reused_and_eta() -> None:
    r = PreparationReport.model_validate(
        report("Tokenizing", timedelta(0), filesDone=12, filesTotal=40, reused=5, etaSeconds=30.4)
    )
    msg = preparation.progress_message(r, "demo-prep-1")
    assert msg == "preparing the dataset in demo-prep-1: tokenizing 12/40 files (5 reused), ETA 30s"


# ----------------------------------------------------------------------------- the planner


def test_a_new_run_prepares_first_on_cpu_then_the_gpu_pod_gets_the_verified_dataset() -> None:
    r = run(preparation=POD_MODE)
    p = step(r, [], timedelta(0))
    pods = [o for o in p.create if o["kind"] == "Pod"]
    assert [o["metadata"]["name"] for o in pods] == ["demo-prep-0"]
    prep = pods[0]
    container = prep["spec"]["containers"][0]
    assert container["args"] == ["prepare", "--tokenize"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert prep["metadata"]["labels"]["app.kubernetes.io/component"] == "preparer"
    assert prep["metadata"]["finalizers"] == ["fermata.dev/cost-accounting"]
    assert prep["spec"]["serviceAccountName"] == "fermata-trainer"
    assert prep["spec"]["securityContext"]["runAsNonRoot"] is True
    terms = prep["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][1]["values"] == ["m5.xlarge"]
    assert r["status"]["phase"] == "Pending" and cond(r, "Prepared")["status"] == "False"

    pod = running(prep_pod(r), "cpu-1", T0 + timedelta(seconds=5))
    r["status"]["preparation"] = report(
        "Tokenizing", timedelta(minutes=2), filesDone=10, filesTotal=40, etaSeconds=360
    )
    p = step(r, [pod], timedelta(minutes=2))
    assert r["status"]["phase"] == "Preparing"
    assert "tokenizing 10/40 files" in r["status"]["message"]
    assert cond(r, "Prepared")["reason"] == "Tokenizing"
    assert not [o for o in p.create if o["kind"] == "Pod"] and not p.stop_pods
    assert r["status"]["preparer"]["pod"]["nodeName"] == "cpu-1"

    pod = terminated(pod, 0, T0 + timedelta(minutes=10))
    r["status"]["preparation"] = completed()
    p = step(r, [pod], timedelta(minutes=10, seconds=2))
    assert cond(r, "Prepared")["status"] == "True" and cond(r, "Prepared")["reason"] == "Verified"
    assert r["status"]["preparer"]["prepared"] is True
    gpu = [o for o in p.create if o["kind"] == "Pod"]
    assert [o["metadata"]["name"] for o in gpu] == ["demo-0"]
    env = {e["name"]: e.get("value") for e in gpu[0]["spec"]["containers"][0]["env"]}
    assert env["FERMATA_PREPARED_CODES_KEY"] == "k" * 32
    assert env["FERMATA_PREPARED_MANIFEST_DIGEST"] == "abc123"
    assert p.release_finalizers == ["demo-prep-0"]  # its span is closed in this status
    assert r["status"]["phase"] == "Pending"
    assert any(e.reason == "Prepared" for e in p.events)

    # The preparation pod is billed on its CPU node at its price, apart from the GPU pod.
    seg = next(s for s in r["status"]["cost"]["segments"] if s["pod"] == "demo-prep-0")
    assert seg["hourlyUSD"] == DEFAULT_PRICES["m5.xlarge/on-demand"] and seg["node"] == "cpu-1"
    assert r["status"]["cost"]["preparationUSD"] == seg["usd"] > 0
    # The training pod runs: the preparation is over and never restarts.
    train = running(pod_for(r), "spot-1", T0 + timedelta(minutes=11))
    r["status"]["progress"] = progress(5, 100, T0 + timedelta(minutes=12))
    p = step(r, [pod, train], timedelta(minutes=12))
    assert r["status"]["phase"] == "Running" and not p.create and not p.stop_pods


def test_an_interrupted_preparation_pod_is_recreated_and_counted_apart() -> None:
    r = run(preparation=POD_MODE, spot={"backoffSeconds": 10})
    step(r, [], timedelta(0))
    pod = running(prep_pod(r), "cpu-1", T0)
    r["status"]["preparation"] = report("Tokenizing", timedelta(minutes=1), filesDone=5, filesTotal=40)
    step(r, [pod], timedelta(minutes=1))
    evicted = terminated(
        deleting(
            with_condition(pod, "DisruptionTarget", reason="EvictionByEvictionAPI"), T0 + timedelta(minutes=2)
        ),
        0,
        T0 + timedelta(minutes=2),
    )
    p = step(r, [evicted], timedelta(minutes=2, seconds=1))
    tr = r["status"]["preparer"]
    assert tr["interruptions"] == 1 and tr["incarnation"] == 1
    assert r["status"]["interruptions"] == 0  # the training pod's budget is untouched
    assert not [o for o in p.create if o["kind"] == "Pod"]
    p = step(r, [evicted], timedelta(minutes=2, seconds=12))
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "Pod"] == ["demo-prep-1"]
    assert "resuming" in r["status"]["message"]


def test_a_config_error_fails_the_run_and_exit_1_is_retried() -> None:
    r = run(preparation=POD_MODE, failures={"maxRetries": 1, "backoffSeconds": 5})
    step(r, [], timedelta(0))
    pod = terminated(running(prep_pod(r), "cpu-1", T0), 1, T0 + timedelta(minutes=1))
    step(r, [pod], timedelta(minutes=1, seconds=1))
    assert r["status"]["preparer"]["failures"] == 1 and r["status"]["phase"] == "Pending"
    p = step(r, [pod], timedelta(minutes=1, seconds=7))
    second = [o for o in p.create if o["kind"] == "Pod"]
    assert [o["metadata"]["name"] for o in second] == ["demo-prep-1"]
    bad = terminated(running(prep_pod(r, 1), "cpu-1", T0), 2, T0 + timedelta(minutes=2))
    bad["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "dataset: no clip has 3 tags"
    step(r, [pod, bad], timedelta(minutes=2, seconds=1))
    assert r["status"]["phase"] == "Failed"
    assert "no clip has 3 tags" in r["status"]["message"]
    assert cond(r, "Prepared")["reason"] == "PreparationFailed"


def test_no_preparation_pod_without_a_price_and_a_stale_preparation_is_idle() -> None:
    r = run(preparation={"mode": "Pod", "resources": {"instanceTypes": ["x9.unknown"]}})
    p = step(r, [], timedelta(0))
    assert not p.create and cond(r, "Accepted")["reason"] == "PriceUnknown"
    assert "x9.unknown/on-demand" in cond(r, "Accepted")["message"]

    r = run(preparation=POD_MODE, idle={"timeout": "10m"})
    step(r, [], timedelta(0))
    pod = running(prep_pod(r), "cpu-1", T0)
    p = step(r, [pod], timedelta(minutes=10))  # never reported: stale since its start
    assert r["status"]["phase"] == "IdleStopped"
    assert cond(r, "Idle")["reason"] == "HeartbeatStale"
    assert ("demo-prep-0", "Idle") in p.stop_pods


def test_a_new_runs_first_status_waits_for_its_preparation_pod_to_be_placed() -> None:
    r = run(preparation=POD_MODE)
    first = step(r, [], timedelta(0))
    assert r["status"]["preparer"]["pod"]["name"] == "demo-prep-0"
    assert first_write_hold({}, first, 3.0, T0 + timedelta(seconds=1)) == 2.0
    placed_pod = prep_pod(r)
    placed_pod["spec"]["nodeName"] = "cpu-1"
    placed = step(r, [placed_pod], timedelta(seconds=1))
    assert r["status"]["preparer"]["pod"]["nodeName"] == "cpu-1"
    assert first_write_hold({}, placed, 3.0, T0 + timedelta(seconds=1)) is None


def test_mode_trainer_creates_the_gpu_pod_at_once() -> None:
    r = run()  # the factories pick mode Trainer
    p = step(r, [], timedelta(0))
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "Pod"] == ["demo-0"]
    env = {e["name"] for e in p.create[-1]["spec"]["containers"][0]["env"]}
    assert "FERMATA_PREPARED_CODES_KEY" not in env


def test_a_preparation_pod_evicted_after_its_verified_report_counts_as_done() -> None:
    r = run(preparation=POD_MODE)
    step(r, [], timedelta(0))
    pod = running(prep_pod(r), "cpu-1", T0)
    gone = deleting(with_condition(pod, "DisruptionTarget", reason="EvictionByEvictionAPI"), T0)
    gone = terminated(gone, 0, T0 + timedelta(minutes=10))
    r["status"]["preparation"] = completed()
    p = step(r, [gone], timedelta(minutes=10, seconds=1))
    assert r["status"]["preparer"]["prepared"] and r["status"]["preparer"]["interruptions"] == 0
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "Pod"] == ["demo-0"]


def test_no_preparation_is_spent_on_a_run_whose_gpu_pod_has_no_price() -> None:
    r = run(preparation=POD_MODE, resources={"instanceTypes": ["x9.gpu"]})
    p = step(r, [], timedelta(0))
    assert not p.create and cond(r, "Accepted")["reason"] == "PriceUnknown"
    assert "x9.gpu/spot" in cond(r, "Accepted")["message"]
