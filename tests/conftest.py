"""Shared pytest fixtures.

Kubernetes: one real control plane per test session (kube-apiserver + etcd, controller-manager,
scheduler from ``tests/cluster``) and one in-process test kubelet playing GPU nodes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fermata_dev.cluster import (
    ControlPlaneError,
    LocalControlPlane,
    ensure_built,
    wait_for_service_account,
)
from fermata_dev.kubelet import DEFAULT_NODES, LocalKubelet

# -- a miniature pretrained MusicGen in a Hugging Face cache ----------------------------------------


@pytest.fixture(scope="session")
def miniature(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``facebook/musicgen-small`` + ``t5-base`` at miniature sizes, in a real HF cache
    (:mod:`fermata_dev.hub`); copy it before changing it."""
    from fermata_dev.hub import build_miniature_hub

    return build_miniature_hub(tmp_path_factory.mktemp("hub") / "hf")


# -- Kubernetes control plane ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def built_images() -> Any:
    """The operator and trainer images of ``make images`` (built now if their inputs changed)."""
    from fermata_dev.images import ensure_built

    return ensure_built()


@pytest.fixture(scope="session")
def testcluster_binary() -> Path:
    """The fermata-testcluster binary, built on first use (skips the tests if it cannot be)."""
    try:
        return ensure_built()
    except ControlPlaneError as exc:
        pytest.skip(f"fermata-testcluster binary cannot be built (tests/cluster/build.sh): {exc}")


@pytest.fixture(scope="session")
def control_plane(
    testcluster_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalControlPlane]:
    """kube-apiserver (+ embedded etcd), kube-controller-manager and kube-scheduler."""
    from fermata_operator.crdgen import render, render_budget

    workdir = tmp_path_factory.mktemp("control-plane")
    crd = workdir / "trainingruns.yaml"
    crd.write_text(render())
    budget_crd = workdir / "trainingbudgets.yaml"
    budget_crd.write_text(render_budget())
    with LocalControlPlane(workdir, testcluster_binary, crds=[crd, budget_crd]) as cp:
        yield cp


@pytest.fixture(scope="session")
def kubeconfig(control_plane: LocalControlPlane) -> Path:
    """Admin kubeconfig of the session's control plane."""
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def k8s_api(control_plane: LocalControlPlane) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` authenticated as cluster admin."""
    api = control_plane.api_client()
    yield api
    api.close()


@pytest.fixture(scope="session")
def _session_kubelet(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKubelet]:
    kubelet = LocalKubelet(kubeconfig, DEFAULT_NODES, workdir=tmp_path_factory.mktemp("kubelet"))
    with kubelet:
        yield kubelet


@pytest.fixture
def kubelet(_session_kubelet: LocalKubelet) -> LocalKubelet:
    """The session's test kubelet, reset for each test: auto mode, the default nodes as
    registered (re-created if deleted, extra taints removed)."""
    _session_kubelet.set_mode("auto")
    _session_kubelet.images.clear()
    _session_kubelet.forward_ports.clear()
    _session_kubelet.node_mounts.clear()
    for name in set(_session_kubelet.node_names) - {n.name for n in DEFAULT_NODES}:
        _session_kubelet.delete_node(name)
    for spec in DEFAULT_NODES:
        _session_kubelet.add_node(spec)
    return _session_kubelet


@pytest.fixture
def namespace(k8s_api: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted after the test."""
    from kubernetes import client

    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s_api)
    core.create_namespace({"metadata": {"name": name}})
    wait_for_service_account(k8s_api, name)
    yield name
    core.delete_namespace(name)
