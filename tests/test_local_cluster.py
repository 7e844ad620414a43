"""The local control plane and the test kubelet, against the real Kubernetes components."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_dev.cluster import LocalControlPlane
from fermata_dev.kubelet import DEFAULT_NODES, SPOT_TAINT, LocalKubelet, map_mounted_path

JSON = dict[str, Any]
SPOT_NODES = {n.name for n in DEFAULT_NODES if n.capacity_type == "spot"}
ON_DEMAND_NODES = {n.name for n in DEFAULT_NODES if n.capacity_type == "on-demand"}
SPOT_TOLERATION = {"key": SPOT_TAINT.key, "operator": "Exists", "effect": SPOT_TAINT.effect}


def pod_manifest(
    name: str,
    *,
    command: list[str] | None = None,
    node_selector: dict[str, str] | None = None,
    tolerations: list[JSON] | None = None,
    gpus: int = 0,
    **spec: Any,
) -> JSON:
    container: JSON = {"name": "main", "image": "ghcr.io/fermata/trainer:test"}
    if command:
        container["command"] = command
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    container.update(spec.pop("container", {}))
    body: JSON = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [container], "restartPolicy": "Never", **spec},
    }
    if node_selector:
        body["spec"]["nodeSelector"] = node_selector
    if tolerations:
        body["spec"]["tolerations"] = tolerations
    return body


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.1)


def pod_gone(core: Any, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


@pytest.fixture
def core(k8s_api: Any) -> Any:
    return client.CoreV1Api(k8s_api)


def test_nodes_ready_with_gpu_capacity_and_labels(kubelet: LocalKubelet, core: Any) -> None:
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert {n.name for n in DEFAULT_NODES} <= set(nodes)
    for spec in DEFAULT_NODES:
        node = nodes[spec.name]
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True"
        assert (datetime.now(UTC) - ready.last_heartbeat_time).total_seconds() < 60
        assert node.status.allocatable["nvidia.com/gpu"] == "1"
        assert node.status.capacity["nvidia.com/gpu"] == "1"
        labels = node.metadata.labels
        assert labels["node.kubernetes.io/instance-type"] == spec.instance_type
        assert labels["topology.kubernetes.io/zone"] == spec.zone
        assert labels["karpenter.sh/capacity-type"] == spec.capacity_type
        assert labels["eks.amazonaws.com/capacityType"] == (
            "SPOT" if spec.capacity_type == "spot" else "ON_DEMAND"
        )
        assert labels["nvidia.com/gpu.present"] == "true"
        assert labels["kubernetes.io/hostname"] == spec.name
        taints = {(t.key, t.value, t.effect) for t in node.spec.taints or []}
        if spec.capacity_type == "spot":
            assert taints == {(SPOT_TAINT.key, SPOT_TAINT.value, SPOT_TAINT.effect)}
        else:
            assert taints == set()  # node.kubernetes.io/not-ready lifted once Ready
    lease = client.CoordinationV1Api(core.api_client).read_namespaced_lease("spot-1", "kube-node-lease")
    assert lease.spec.holder_identity == "spot-1"
    assert (datetime.now(UTC) - lease.spec.renew_time).total_seconds() < 60


def test_spot_pod_with_toleration_runs_on_spot_node(kubelet: LocalKubelet, core: Any, namespace: str) -> None:
    body = pod_manifest(
        "spot-trainer",
        node_selector={"karpenter.sh/capacity-type": "spot"},
        tolerations=[SPOT_TOLERATION],
        gpus=1,
    )
    core.create_namespaced_pod(namespace, body)
    pod = kubelet.wait_for_phase(namespace, "spot-trainer", "Running")
    assert pod["spec"]["nodeName"] in SPOT_NODES
    conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    assert conditions["PodScheduled"] == "True"
    assert pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    assert pod["status"]["podIP"] == "127.0.0.1"


def test_pod_without_toleration_is_not_scheduled_on_spot_nodes(
    kubelet: LocalKubelet, core: Any, namespace: str
) -> None:
    core.create_namespaced_pod(
        namespace,
        pod_manifest("no-toleration", node_selector={"karpenter.sh/capacity-type": "spot"}),
    )
    core.create_namespaced_pod(namespace, pod_manifest("anywhere"))

    def unschedulable() -> JSON | None:
        pod = kubelet.read_pod(namespace, "no-toleration")
        conditions: list[JSON] = pod["status"].get("conditions") or []
        return next(
            (c for c in conditions if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"),
            None,
        )

    cond = wait_until(unschedulable, what="PodScheduled=False/Unschedulable")
    assert "untolerated taint" in cond["message"]
    assert not kubelet.read_pod(namespace, "no-toleration")["spec"].get("nodeName")

    anywhere = kubelet.wait_for_phase(namespace, "anywhere", "Running")
    assert anywhere["spec"]["nodeName"] in ON_DEMAND_NODES


def test_manual_mode_transitions_and_exit_codes(kubelet: LocalKubelet, core: Any, namespace: str) -> None:
    kubelet.set_mode("manual")
    for name in ("ok", "oom", "preempted"):
        core.create_namespaced_pod(namespace, pod_manifest(name))
    for name in ("ok", "oom", "preempted"):
        kubelet.wait_for_pod(namespace, name, lambda p: bool(p["spec"].get("nodeName")))
    time.sleep(1.0)
    assert kubelet.read_pod(namespace, "ok")["status"]["phase"] == "Pending"

    kubelet.set_running(namespace, "ok")
    assert kubelet.read_pod(namespace, "ok")["status"]["phase"] == "Running"
    kubelet.set_succeeded(namespace, "ok")
    ok = kubelet.read_pod(namespace, "ok")
    assert ok["status"]["phase"] == "Succeeded"
    terminated = ok["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert "running" not in ok["status"]["containerStatuses"][0]["state"]

    kubelet.set_running(namespace, "oom")
    kubelet.set_failed(namespace, "oom", exit_code=137, reason="OOMKilled")
    oom = kubelet.read_pod(namespace, "oom")
    assert oom["status"]["phase"] == "Failed"
    terminated = oom["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "OOMKilled")

    kubelet.set_running(namespace, "preempted")
    kubelet.add_disruption_target(namespace, "preempted")
    conditions = {c["type"]: c for c in kubelet.read_pod(namespace, "preempted")["status"]["conditions"]}
    assert conditions["DisruptionTarget"]["status"] == "True"
    assert conditions["DisruptionTarget"]["reason"] == "TerminationByKubelet"

    kubelet.evict(namespace, "preempted")
    wait_until(lambda: pod_gone(core, namespace, "preempted"), what="evicted pod deleted")


def test_delete_and_taint_node(kubelet: LocalKubelet, core: Any, namespace: str) -> None:
    kubelet.set_mode("manual")
    body = pod_manifest(
        "victim", node_selector={"kubernetes.io/hostname": "spot-2"}, tolerations=[SPOT_TOLERATION]
    )
    core.create_namespaced_pod(namespace, body)
    kubelet.wait_for_pod(namespace, "victim", lambda p: p["spec"].get("nodeName") == "spot-2")
    kubelet.set_running(namespace, "victim")

    kubelet.taint_node("spot-2", "karpenter.sh/disrupted", effect="NoSchedule")
    taints = {t.key for t in core.read_node("spot-2").spec.taints}
    assert {"karpenter.sh/disrupted", SPOT_TAINT.key} <= taints

    kubelet.delete_node("spot-2")
    wait_until(lambda: pod_gone(core, namespace, "victim"), what="pod on deleted node removed")
    assert "spot-2" not in {n.metadata.name for n in core.list_node().items}


def test_deleted_pod_gets_a_terminal_status_before_its_finalizer_is_released(
    kubelet: LocalKubelet, core: Any, namespace: str
) -> None:
    body = pod_manifest("held")
    body["metadata"]["finalizers"] = ["fermata.dev/test-hold"]
    core.create_namespaced_pod(namespace, body)
    kubelet.wait_for_phase(namespace, "held", "Running")
    core.delete_namespaced_pod("held", namespace)
    pod = kubelet.wait_for_phase(namespace, "held", "Failed")
    assert pod["metadata"]["deletionTimestamp"]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143
    core.patch_namespaced_pod("held", namespace, {"metadata": {"finalizers": None}})
    wait_until(lambda: pod_gone(core, namespace, "held"), what="pod removed")


def test_garbage_collector_deletes_dependents(kubelet: LocalKubelet, core: Any, namespace: str) -> None:
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    body = pod_manifest("dependent")
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    ]
    core.create_namespaced_pod(namespace, body)
    kubelet.wait_for_phase(namespace, "dependent", "Running")
    core.delete_namespaced_config_map("owner", namespace)
    wait_until(lambda: pod_gone(core, namespace, "dependent"), timeout=60, what="GC deletes the pod")


def test_pod_security_rejects_privileged_pod(kubelet: LocalKubelet, core: Any, namespace: str) -> None:
    core.patch_namespace(
        namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    body = pod_manifest("privileged", container={"securityContext": {"privileged": True}})
    with pytest.raises(ApiException) as excinfo:
        core.create_namespaced_pod(namespace, body)
    assert excinfo.value.status == 403
    message = json.loads(excinfo.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "privileged" in message


EXEC_SCRIPT = textwrap.dedent(
    """
    import os, pathlib, sys
    text = pathlib.Path(os.environ["GREETING_FILE"]).read_text()
    print(f"{os.environ['GREETING']} {os.environ['POD_NAME']} {text}", flush=True)
    print("kubeconfig", os.path.exists(os.environ["KUBECONFIG"]), flush=True)
    print("argv", pathlib.Path(sys.argv[1]).read_text(), flush=True)
    pathlib.Path(os.environ["SCRATCH"], "note.txt").write_text("scratch-ok")
    print("scratch", os.environ["SCRATCH"], flush=True)
    print("cwd", os.getcwd(), flush=True)
    print("outside", os.environ["OUTSIDE"], os.environ["LOOKALIKE"], flush=True)
    sys.exit(3)
    """
)


def test_exec_mode_runs_the_command_and_reports_its_exit_code(
    kubelet: LocalKubelet, core: Any, namespace: str
) -> None:
    kubelet.set_mode("exec")
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cfg"}, "data": {"greeting.txt": "from-configmap"}}
    )
    body = pod_manifest(
        "exec-3",
        command=[sys.executable, "-c", EXEC_SCRIPT, "$(GREETING_FILE)"],
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}],
        container={
            "env": [
                {"name": "GREETING", "value": "hello"},
                {
                    "name": "POD_NAME",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                },
                # Paths in the pod's env that lie under a mount are rewritten to the volume...
                {"name": "GREETING_FILE", "value": "/etc/fermata/greeting.txt"},
                {"name": "SCRATCH", "value": "/scratch"},
                # ...every other path is the host's, as it is.
                {"name": "OUTSIDE", "value": "/opt/host-data/x"},
                {"name": "LOOKALIKE", "value": "/etc/fermata-other/y"},
            ],
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/etc/fermata"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
            "workingDir": "/scratch/work",
        },
    )
    core.create_namespaced_pod(namespace, body)
    pod = kubelet.wait_for_phase(namespace, "exec-3", "Failed", timeout=60)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    logs = kubelet.logs(namespace, "exec-3")
    assert "hello exec-3 from-configmap" in logs
    assert "kubeconfig True" in logs
    assert "argv from-configmap" in logs
    assert "outside /opt/host-data/x /etc/fermata-other/y" in logs
    lines = dict(line.split(" ", 1) for line in logs.splitlines() if " " in line)
    scratch, cwd = Path(lines["scratch"]), Path(lines["cwd"])
    assert scratch.is_relative_to(kubelet.workdir), scratch
    assert (scratch / "note.txt").read_text() == "scratch-ok"
    assert cwd.resolve() == (scratch / "work").resolve()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/etc/fermata", "etc/fermata"),
        ("/etc/fermata/trainer.json", "etc/fermata/trainer.json"),
        ("/tmp", "tmp"),
        ("/tmp/hf", "tmp/hf"),
        ("/tmp//fermata/", "tmp/fermata"),
        ("/etc/fermata-other", None),
        ("/work/checkout/.fermata/demo/data", None),
        ("relative/path", None),
        ("", None),
    ],
)
def test_map_mounted_path(path: str, expected: str | None) -> None:
    rootfs = Path("/pods/p/root")
    mapped = map_mounted_path(path, ["/etc/fermata", "/tmp/", "/dev/shm"], rootfs)
    assert mapped == (None if expected is None else rootfs / expected)


def test_exec_pod_acts_with_its_service_account_rbac(
    kubelet: LocalKubelet,
    core: Any,
    k8s_api: Any,
    namespace: str,
    control_plane: LocalControlPlane,
) -> None:
    kubelet.set_mode("exec")
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-configmaps",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "visible"}})
    kubectl = [str(control_plane.binary), "kubectl"]
    for name, args in (
        ("allowed", ["get", "configmap", "visible"]),
        ("forbidden", ["get", "secrets"]),
    ):
        core.create_namespaced_pod(
            namespace, pod_manifest(name, command=[*kubectl, *args], serviceAccountName="reader")
        )
    allowed = kubelet.wait_for_phase(namespace, "allowed", "Succeeded", "Failed", timeout=60)
    assert allowed["status"]["phase"] == "Succeeded", kubelet.logs(namespace, "allowed")
    forbidden = kubelet.wait_for_phase(namespace, "forbidden", "Succeeded", "Failed", timeout=60)
    assert forbidden["status"]["phase"] == "Failed"
    assert f"system:serviceaccount:{namespace}:reader" in kubelet.logs(namespace, "forbidden")
    assert "forbidden" in kubelet.logs(namespace, "forbidden").lower()


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    def on_term(signum, frame):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    time.sleep(600)
    """
)

IGNORE_SIGTERM_SCRIPT = textwrap.dedent(
    """
    import signal, time
    signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


def test_deleting_a_running_exec_pod_sigterms_the_process(
    kubelet: LocalKubelet, core: Any, namespace: str
) -> None:
    kubelet.set_mode("exec")
    core.create_namespaced_pod(
        namespace, pod_manifest("graceful", command=[sys.executable, "-c", SIGTERM_SCRIPT])
    )
    kubelet.wait_for_phase(namespace, "graceful", "Running", timeout=60)
    wait_until(lambda: "ready" in kubelet.logs(namespace, "graceful"), what="process started")
    started = time.monotonic()
    core.delete_namespaced_pod("graceful", namespace)  # default grace period: 30 s
    wait_until(lambda: pod_gone(core, namespace, "graceful"), what="pod deleted")
    assert time.monotonic() - started < 20
    assert "got SIGTERM" in kubelet.logs(namespace, "graceful")


def test_grace_period_ends_with_sigkill(kubelet: LocalKubelet, core: Any, namespace: str) -> None:
    kubelet.set_mode("exec")
    body = pod_manifest(
        "stubborn",
        command=[sys.executable, "-c", IGNORE_SIGTERM_SCRIPT],
        terminationGracePeriodSeconds=2,
    )
    core.create_namespaced_pod(namespace, body)
    kubelet.wait_for_phase(namespace, "stubborn", "Running", timeout=60)
    wait_until(lambda: "ready" in kubelet.logs(namespace, "stubborn"), what="process started")
    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    wait_until(lambda: pod_gone(core, namespace, "stubborn"), what="pod deleted")
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 15
    assert "ignoring SIGTERM" in kubelet.logs(namespace, "stubborn")


def test_kubectl_helper(control_plane: LocalControlPlane) -> None:
    result = control_plane.kubectl("get", "namespace", "default", "-o", "name", check=True)
    assert result.stdout.strip() == "namespace/default"
    version = control_plane.kubectl("version", "-o", "json", check=True)
    assert json.loads(version.stdout)["serverVersion"]["gitVersion"].startswith("v1.35")


def test_apiserver_restart_keeps_objects_and_kubelet_recovers(
    control_plane: LocalControlPlane, kubelet: LocalKubelet, k8s_api: Any, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "survivor"}, "data": {"k": "v"}})
    control_plane.restart_apiserver()
    assert core.read_namespaced_config_map("survivor", namespace).data == {"k": "v"}
    # The scheduler, the controller-manager and the kubelet's watch reconnect on their own.
    core.create_namespaced_pod(namespace, pod_manifest("after-restart"))
    pod = kubelet.wait_for_phase(namespace, "after-restart", "Running", timeout=60)
    assert pod["spec"]["nodeName"] in ON_DEMAND_NODES
