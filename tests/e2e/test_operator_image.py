"""The operator as a platform team runs it: `helm install`, the Deployment's pods from the operator
image `make images` built, as the chart's ServiceAccount with the chart's RBAC.

A control plane of its own (the Deployment and ReplicaSet controllers run here, as in a real
cluster), a CPU node for the operator and a spot GPU node for trainer pods, played by the test
kubelet: a pod naming a built image runs from it (its root file system read-only, uid 1000,
in-cluster credentials from its projected ServiceAccount token, a network namespace of its own).
Two replicas with kopf peering: both start, exactly one acts (the other stands by), and the run
reaches its pod and Running; when the acting replica is deleted, exactly one replica takes the
next run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from fermata_dev.cluster import DEFAULT_CONTROLLERS, LocalControlPlane
from fermata_dev.images import OPERATOR, Image, by_target
from fermata_dev.kubelet import DEFAULT_NODES, LocalKubelet, NodeSpec
from tests.e2e.conftest import Runs, spec, wait_for
from tests.e2e.test_chart import CHART, helm, run_helm  # noqa: F401  (helm: fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.slow]

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@pytest.fixture(scope="module")
def apps_plane(
    testcluster_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalControlPlane]:
    workdir = tmp_path_factory.mktemp("apps-plane")
    controllers = (*DEFAULT_CONTROLLERS, "deployment", "replicaset")
    with LocalControlPlane(workdir, testcluster_binary, controllers=controllers) as cp:
        yield cp


@pytest.fixture(scope="module")
def nodes_with_images(
    apps_plane: LocalControlPlane, built_images: dict[str, Image], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKubelet]:
    cpu = NodeSpec("cpu-1", "m5.xlarge", "on-demand", "us-east-1a", gpus=0, cpu="8", memory="32Gi")
    spot = next(n for n in DEFAULT_NODES if n.name == "spot-1")
    kubelet = LocalKubelet(
        apps_plane.kubeconfig, [cpu, spot], workdir=tmp_path_factory.mktemp("kubelet"), images=built_images
    )
    with kubelet:
        yield kubelet


def _namespace(core: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    return name


def test_helm_installed_operator_runs_from_its_image_two_replicas_one_acts(
    helm: Path,  # noqa: F811
    apps_plane: LocalControlPlane,
    nodes_with_images: LocalKubelet,
    built_images: dict[str, Image],
) -> None:
    kubelet = nodes_with_images
    api = apps_plane.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    release_ns, runs_ns = _namespace(core, "fermata-system"), _namespace(core, "team")
    release = "fermata"
    run_helm(
        helm,
        "install",
        release,
        str(CHART),
        "--namespace",
        release_ns,
        "--set",
        "replicaCount=2",
        "--set",
        f"watchNamespaces={{{runs_ns}}}",
        "--set",
        "operator.resyncSeconds=2",
        "--set-string",
        "priceTable.prices.g4dn\\.xlarge/spot=0.123",
        kubeconfig=apps_plane.kubeconfig,
    )
    operator_image = by_target(built_images, OPERATOR)
    dep = apps.read_namespaced_deployment(release, release_ns)
    assert dep.spec.template.spec.containers[0].image == operator_image.ref
    assert "--peering" in dep.spec.template.spec.containers[0].args

    def operator_pods() -> list[Any]:
        pods = core.list_namespaced_pod(release_ns, label_selector="app.kubernetes.io/name=fermata").items
        running = [p for p in pods if p.status.phase == "Running"]
        return running if len(running) == 2 else []

    pods = wait_for(operator_pods, timeout=120, what="two operator pods Running")
    assert {p.spec.node_name for p in pods} == {"cpu-1"}
    names = [p.metadata.name for p in pods]
    wait_for(
        lambda: all("operator started" in kubelet.logs(release_ns, n) for n in names),
        timeout=120,
        what="both replicas started (from the image, in-cluster credentials)",
    )

    # Both replicas are peers (kopf's KopfPeering in the watched namespace), with distinct
    # priorities: the higher one acts, the other stands by.
    custom = client.CustomObjectsApi(api)

    def peers() -> dict[str, Any]:
        body = custom.get_namespaced_custom_object("kopf.dev", "v1", runs_ns, "kopfpeerings", "fermata")
        found = dict(body.get("status") or {})
        return found if len(found) == 2 else {}

    priorities = {
        peer: info["priority"] for peer, info in wait_for(peers, timeout=60, what="two peers").items()
    }
    assert set(priorities) == set(names) and len(set(priorities.values())) == 2, priorities
    leader = max(priorities, key=lambda peer: priorities[peer])

    runs = Runs(api, runs_ns)
    runs.create("charted", spec(resources={"gpus": 1}))
    wait_for(lambda: runs.status("charted").get("phase") == "Running", timeout=120, what="Running")
    assert [p.metadata.name for p in runs.pods("charted")] == ["charted-0"]
    wait_for(
        lambda: (runs.status("charted").get("cost") or {}).get("hourlyRateUSD") == 0.123,
        timeout=60,
        what="priced from the chart's table",
    )

    logs = {n: kubelet.logs(release_ns, n) for n in names}
    acting = [n for n, text in logs.items() if "created pod charted-0" in text]
    assert acting == [leader], {n: text[-2000:] for n, text in logs.items()}
    standby = next(n for n in names if n != leader)
    assert "charted" not in logs[standby], logs[standby][-3000:]
    for text in logs.values():
        assert "Possibly conflicting operators" not in text
        for needle in ("Forbidden", '"status": 403', "Not enough permissions"):
            assert needle not in text, text[-3000:]

    runs.delete("charted")
    wait_for(lambda: not runs.exists("charted"), timeout=60, what="the acting replica finalized the run")

    # Failover: the acting replica goes away (a node drain, a rollout). The standby resumes, or
    # the ReplicaSet's replacement outranks it; either way exactly one replica takes the next run.
    core.delete_namespaced_pod(leader, release_ns)
    pods = wait_for(
        lambda: (found := operator_pods()) and leader not in {p.metadata.name for p in found} and found,
        timeout=180,
        what="the leader gone, two replicas running again",
    )
    runs.create("after", spec(resources={"gpus": 1}))
    wait_for(
        lambda: runs.status("after").get("phase") == "Running", timeout=180, what="Running after failover"
    )
    creators = [
        p.metadata.name for p in pods if "created pod after-0" in kubelet.logs(release_ns, p.metadata.name)
    ]
    assert len(creators) == 1, creators
    runs.delete("after")
    wait_for(lambda: not runs.exists("after"), timeout=60, what="the new acting replica finalized the run")
