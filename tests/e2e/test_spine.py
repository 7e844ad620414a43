"""The spine against the real API server: CRD validation, one pod per run, phases, GC, restarts."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from fermata_dev.cluster import LocalControlPlane
from fermata_dev.kubelet import LocalKubelet
from tests.e2e.conftest import GROUP, PLURAL, VERSION, OperatorProcess, Runs, spec, wait_for

pytestmark = pytest.mark.cluster


def _single_pod(runs: Runs, name: str) -> Any:
    pods = wait_for(lambda: runs.pods(name), what="trainer pod")
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def _bound(runs: Runs, pod: str) -> Any:
    return wait_for(
        lambda: (p := runs.core.read_namespaced_pod(pod, runs.ns)).spec.node_name and p,
        timeout=30,
        what=f"{pod} scheduled",
    )


def test_create_gives_one_restricted_pod_on_a_spot_gpu_node(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("small", spec(resources={"gpus": 1, "instanceTypes": ["g4dn.xlarge"]}))
    wait_for(lambda: runs.status("small").get("phase") == "Running", timeout=60, what="Running")
    pod = _single_pod(runs, "small")
    node = runs.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["karpenter.sh/capacity-type"] == "spot"
    assert node.metadata.labels["node.kubernetes.io/instance-type"] == "g4dn.xlarge"
    c = pod.spec.containers[0]
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.termination_grace_period_seconds >= 120
    assert pod.spec.security_context.run_as_non_root is True
    assert c.security_context.capabilities.drop == ["ALL"]
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("TrainingRun", "small", True)
    # The configuration rides on the pod (an annotation the container reads as a file).
    cfg = json.loads(pod.metadata.annotations["fermata.dev/trainer-config"])
    assert cfg["run"]["name"] == "small" and cfg["storage"]["checkpoints"] == "s3://ml-runs/test/"
    st = runs.status("small")
    assert st["pod"]["nodeName"] == pod.spec.node_name and st["capacity"] == "spot"
    assert st["observedGeneration"] == 1
    ready = runs.condition("small", "Ready")
    assert ready is not None and ready["status"] == "True"
    reasons = {e.reason for e in runs.events("small")}
    assert {"PodCreated", "Running"} <= reasons


def _status_history(runs: Runs, name: str, since: str) -> list[dict[str, Any]]:
    """Every status the run has had since resourceVersion ``since``, in order (replayed by a
    watch from the API server's watch cache), each one written once."""
    seen: list[dict[str, Any]] = []
    for ev in watch.Watch().stream(
        runs.custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        runs.ns,
        PLURAL,
        field_selector=f"metadata.name={name}",
        resource_version=since,
        timeout_seconds=2,
    ):
        status = ev["object"].get("status")
        if status and (not seen or seen[-1] != status):
            seen.append(status)
    return seen


def _status_written(run: dict[str, Any]) -> datetime:
    """When the operator last wrote the run's status (its managedFields entry, to the second)."""
    entry = next(
        m
        for m in run["metadata"]["managedFields"]
        if m["manager"] == "fermata-operator" and m.get("subresource") == "status"
    )
    return datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))


def test_a_new_runs_created_and_placed_pod_is_one_status_write(
    runs: Runs,
    operator_factory: Callable[..., OperatorProcess],
    restricted_namespace: str,
    kubelet: LocalKubelet,
) -> None:
    kubelet.set_mode("manual")
    operator_factory(restricted_namespace, FERMATA_FIRST_STATUS_HOLD_SECONDS="30")
    made = runs.create("once", spec())
    _bound(runs, "once-0")
    st = wait_for(lambda: (s := runs.status("once")).get("pod") and s, timeout=30, what="first status")
    history = _status_history(runs, "once", made["metadata"]["resourceVersion"])
    # The first status the run ever had names its pod and where it was placed: "created" and
    # "placed" were one write, not two.
    assert len(history) == 1, history
    assert history[0]["pod"]["name"] == "once-0" and history[0]["pod"]["nodeName"]
    scheduled = next(c for c in history[0]["conditions"] if c["type"] == "PodScheduled")
    assert scheduled["status"] == "True"
    assert st["phase"] == "Pending" and st["pod"]["nodeName"] == history[0]["pod"]["nodeName"]
    kubelet.set_running(runs.ns, "once-0")
    wait_for(lambda: runs.status("once").get("phase") == "Running", timeout=30, what="Running")


def test_a_first_pod_that_cannot_be_placed_is_reported_when_the_hold_ends(
    runs: Runs,
    operator_factory: Callable[..., OperatorProcess],
    restricted_namespace: str,
    kubelet: LocalKubelet,
) -> None:
    operator_factory(restricted_namespace, FERMATA_FIRST_STATUS_HOLD_SECONDS="3")
    runs.create("unplaced", spec(resources={"gpus": 8}))  # no node has 8 GPUs
    st = wait_for(lambda: (s := runs.status("unplaced")).get("pod") and s, timeout=30, what="first status")
    assert st["phase"] == "Pending" and st["pod"]["name"] == "unplaced-0"
    assert not st["pod"].get("nodeName")
    pod = runs.core.read_namespaced_pod("unplaced-0", runs.ns)
    held = (_status_written(runs.get("unplaced")) - pod.metadata.creation_timestamp).total_seconds()
    assert 2 <= held <= 15, held  # the hold (3 s; both times to the second), then written anyway
    wait_for(
        lambda: (c := runs.condition("unplaced", "WaitingForCapacity")) and c["status"] == "True",
        timeout=30,
        what="WaitingForCapacity",
    )


def test_operator_killed_and_restarted_keeps_exactly_one_pod(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    kubelet.set_mode("manual")
    runs.create("restart", spec())
    _single_pod(runs, "restart")
    operator.kill()
    operator.start()
    _bound(runs, "restart-0")
    kubelet.set_running(runs.ns, "restart-0")
    wait_for(
        lambda: runs.status("restart").get("phase") == "Running", timeout=60, what="Running after restart"
    )
    for _ in range(3):
        operator.kill()
        operator.start()
        wait_for(lambda: "operator started" in operator.log(), timeout=30)
    # Give the restarted operator several resyncs to (not) do anything.
    import time

    time.sleep(6)
    pods = runs.pods("restart")
    assert [p.metadata.name for p in pods] == ["restart-0"]
    assert runs.status("restart")["incarnation"] == 0


def test_pod_failure_fails_the_run_with_the_reason(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    kubelet.set_mode("manual")
    runs.create("crash", spec(failures={"maxRetries": 0}))
    _single_pod(runs, "crash")
    _bound(runs, "crash-0")
    kubelet.set_running(runs.ns, "crash-0")
    wait_for(lambda: runs.status("crash").get("phase") == "Running", timeout=30)
    kubelet.set_failed(runs.ns, "crash-0", exit_code=137, reason="OOMKilled")
    st = wait_for(
        lambda: (s := runs.status("crash")).get("phase") == "Failed" and s, timeout=30, what="Failed"
    )
    assert "OOMKilled" in st["message"] and "137" in st["message"]
    assert st["failures"] == 1 and st["interruptions"] == 0
    assert st["decision"] == "NO-GO"
    failed = runs.condition("crash", "Failed")
    assert failed is not None and failed["reason"] == "OOMKilled"
    assert "TrainerFailed" in {e.reason for e in runs.events("crash")}
    # The failed pod's finalizer is released once its cost is recorded.
    wait_for(
        lambda: "fermata.dev/cost-accounting"
        not in (runs.core.read_namespaced_pod("crash-0", runs.ns).metadata.finalizers or []),
        what="finalizer released",
    )


def test_deleting_the_run_removes_its_pods_through_garbage_collection(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("gone", spec())
    wait_for(lambda: runs.status("gone").get("phase") == "Running", timeout=60)
    _single_pod(runs, "gone")
    runs.delete("gone")
    wait_for(lambda: not runs.exists("gone"), timeout=60, what="run deleted")
    wait_for(lambda: runs.pods("gone") == [], timeout=90, what="pods garbage-collected")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"spot": {"maxInterruptions": 2, "fallbackToOnDemandAfter": 5}},
            "fallbackToOnDemandAfter must not exceed maxInterruptions",
        ),
        ({"budget": {"maxUSD": 100, "warnAtFraction": 1.5}}, "warnAtFraction"),
        (
            {"gates": [{"name": "w5", "at": {"elapsed": "35d"}, "require": {}}]},
            "a gate needs at least one of",
        ),
        (
            {
                "gates": [
                    {"name": "w5", "at": {"elapsed": "35d", "step": 3}, "require": {"maxValidationLoss": 3}}
                ]
            },
            "set exactly one of elapsed, step or epoch",
        ),
        (
            {"gates": [{"name": "w5", "at": {"step": 3}, "require": {"maxCostUSD": 900}}]},
            "maxCostUSD cannot exceed budget.maxUSD",
        ),
        ({"idle": {"timeout": "two hours"}}, "spec.idle.timeout"),
        ({"resources": {"image": "x", "capacity": "reserved"}}, "spec.resources.capacity: Unsupported value"),
    ],
)
def test_invalid_specs_are_rejected_with_a_readable_message(
    runs: Runs, patch: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as err:
        runs.create("bad", spec(**patch))
    assert err.value.status == 422
    assert message in err.value.body, err.value.body


def test_immutable_storage_and_long_names(runs: Runs) -> None:
    runs.create("imm", spec())
    with pytest.raises(ApiException) as err:
        runs.patch_spec("imm", {"storage": {"checkpoints": "s3://elsewhere/"}})
    assert "storage.checkpoints is immutable" in err.value.body
    with pytest.raises(ApiException) as err:
        runs.patch_spec("imm", {"dataset": {"uri": "s3://other-data/"}})
    assert "dataset is immutable" in err.value.body
    with pytest.raises(ApiException) as err:
        runs.patch_spec("imm", {"resumeFrom": "s3://x/r/checkpoints/step-000000001/manifest.json"})
    assert "resumeFrom is immutable" in err.value.body
    runs.patch_spec("imm", {"training": {"epochs": 30}, "budget": {"maxUSD": 700}})  # these may change
    with pytest.raises(ApiException) as err:
        runs.create("x" * 53, spec())
    assert "at most 52 characters" in err.value.body


def test_kubectl_columns_explain_and_defaults(
    runs: Runs, control_plane: LocalControlPlane, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("cols", spec())
    wait_for(lambda: runs.status("cols").get("phase") == "Running", timeout=60)
    out = control_plane.kubectl("get", "trainingruns", "-n", runs.ns, check=True).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "DECISION", "PROGRESS", "COST", "BUDGET", "ETA", "AGE"]
    assert "Running" in out
    assert "cols" in control_plane.kubectl("get", "tr", "-n", runs.ns, check=True).stdout
    assert "cols" in control_plane.kubectl("get", "fermata", "-n", runs.ns, check=True).stdout
    explain = control_plane.kubectl("explain", "trainingrun.spec.budget", check=True).stdout
    assert "warnAtFraction" in explain and "BudgetWarning condition" in explain
    explain = control_plane.kubectl("explain", "trainingrun.spec", check=True).stdout
    assert "Desired state of a MusicGen fine-tuning run" in explain
    # Defaults are filled in by the API server.
    obj = runs.get("cols")
    assert obj["spec"]["idle"]["timeout"] == "2h"
    assert obj["spec"]["spot"]["fallbackToOnDemandAfter"] == 3


def test_trainer_service_account_may_patch_status_and_nothing_else(
    runs: Runs,
    operator: OperatorProcess,
    kubelet: LocalKubelet,
    k8s_api: Any,
    control_plane: LocalControlPlane,
) -> None:
    """RBAC alone: the namespace's trainer ServiceAccount may patch runs' status and nothing else
    (no spec, no reads, no Secrets). Which run's status — only its own pod's — is the chart's
    status-guard policy (tests/e2e/test_admission_policies.py, not installed here)."""
    runs.create("rbac-a", spec())
    wait_for(lambda: runs.status("rbac-a").get("phase") == "Running", timeout=60)
    pod = runs.core.read_namespaced_pod("rbac-a-0", runs.ns)
    assert pod.spec.service_account_name == "fermata-trainer"
    bound = {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid}
    token = runs.core.create_namespaced_service_account_token(
        "fermata-trainer", runs.ns, {"spec": {"expirationSeconds": 600, "boundObjectRef": bound}}
    ).status.token
    cfg = client.Configuration()
    cfg.host = control_plane.server
    cfg.verify_ssl = False
    cfg.api_key = {"authorization": f"Bearer {token}"}
    as_trainer = client.CustomObjectsApi(client.ApiClient(cfg))
    body = {"status": {"progress": {"state": "Training", "heartbeatTime": "2026-01-01T00:00:00Z", "step": 1}}}
    as_trainer.patch_namespaced_custom_object_status(
        "fermata.dev", "v1alpha1", runs.ns, "trainingruns", "rbac-a", body
    )
    for forbidden in (
        lambda: as_trainer.patch_namespaced_custom_object(
            "fermata.dev", "v1alpha1", runs.ns, "trainingruns", "rbac-a", {"spec": {"suspend": True}}
        ),
        lambda: as_trainer.get_namespaced_custom_object(
            "fermata.dev", "v1alpha1", runs.ns, "trainingruns", "rbac-a"
        ),
        lambda: client.CoreV1Api(client.ApiClient(cfg)).list_namespaced_secret(runs.ns),
        lambda: client.CoreV1Api(client.ApiClient(cfg)).list_namespaced_pod(runs.ns),
    ):
        with pytest.raises(ApiException) as err:
            forbidden()
        assert err.value.status == 403


def test_restricted_namespace_rejects_a_privileged_pod(runs: Runs) -> None:
    pod = {
        "metadata": {"name": "priv"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    with pytest.raises(ApiException) as err:
        runs.core.create_namespaced_pod(runs.ns, pod)
    assert "violates PodSecurity" in err.value.body
