"""Fixtures for operator tests against the real control plane: CRD, operator process, helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_api import contract
from fermata_dev.cluster import LocalControlPlane
from fermata_operator.crdgen import render, render_budget

GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL


@pytest.fixture(scope="session")
def crd(control_plane: LocalControlPlane, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("crd") / "crd.yaml"
    path.write_text(render())
    control_plane.kubectl("apply", "--server-side", "-f", str(path), check=True)
    control_plane.wait_established(path)
    budget = path.parent / "budget-crd.yaml"
    budget.write_text(render_budget())
    control_plane.kubectl("apply", "--server-side", "-f", str(budget), check=True)
    control_plane.wait_established(budget)


@pytest.fixture
def restricted_namespace(namespace: str, k8s_api: Any) -> str:
    """The test namespace, enforcing the `restricted` Pod Security level."""
    client.CoreV1Api(k8s_api).patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )
    return namespace


class OperatorProcess:
    """The operator as a real process (so tests can SIGKILL and restart it)."""

    def __init__(self, kubeconfig: Path, namespace: str, log_dir: Path, env: dict[str, str]) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_dir / "operator.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.log_path.open("ab")
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FERMATA_LOG_FORMAT": "json",
            "FERMATA_RESYNC_SECONDS": "2",
            "FERMATA_PRICE_TABLE": "fermata-system/absent",
            # Test trainers that never answer a stop request are SIGTERMed after 3 s.
            "FERMATA_CHECKPOINT_REQUEST_TIMEOUT_SECONDS": "3",
            **self.env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fermata_operator", "-n", self.namespace],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup, like an OOM kill or a node loss."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _drain(api: Any, namespace: str, timeout: float = 60.0) -> None:
    """Delete the namespace's runs and wait until their pods are gone (frees the fake GPUs)."""
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    for run in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, run["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 404:
                raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not core.list_namespaced_pod(namespace, label_selector="fermata.dev/run").items:
            return
        time.sleep(0.3)
    raise AssertionError(f"pods of {namespace} not gone after {timeout}s")


@pytest.fixture
def operator_factory(
    kubeconfig: Path, crd: None, tmp_path: Path, k8s_api: Any
) -> Iterator[Callable[..., OperatorProcess]]:
    procs: list[OperatorProcess] = []

    def make(namespace: str, **env: str) -> OperatorProcess:
        op = OperatorProcess(kubeconfig, namespace, tmp_path, env)
        op.start()
        procs.append(op)
        return op

    yield make
    try:
        for op in procs:
            if op.proc is not None and op.proc.poll() is not None:
                op.start()  # a test that killed it: the operator must finish the cleanup
        for ns in {op.namespace for op in procs}:
            _drain(k8s_api, ns)
    finally:
        for op in procs:
            op.stop()


@pytest.fixture
def operator(operator_factory: Callable[..., OperatorProcess], restricted_namespace: str) -> OperatorProcess:
    return operator_factory(restricted_namespace)


class Runs:
    """Small helpers over the TrainingRun API."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": name},
            "spec": spec,
        }
        obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, body
        )
        return obj

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return obj

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def pods(self, name: str) -> list[Any]:
        items: list[Any] = self.core.list_namespaced_pod(
            self.ns, label_selector=f"fermata.dev/run={name}"
        ).items
        return items

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, name: str, ctype: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == ctype), None)

    def events(self, name: str) -> list[Any]:
        items: list[Any] = self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name},involvedObject.kind=TrainingRun"
        ).items
        return items

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise


@pytest.fixture
def runs(k8s_api: Any, restricted_namespace: str, crd: None) -> Runs:
    return Runs(k8s_api, restricted_namespace)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ApiException as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}")


def spec(**overrides: Any) -> dict[str, Any]:
    """A minimal valid spec; nested dicts in overrides are merged one level deep."""
    base: dict[str, Any] = {
        "dataset": {"uri": "s3://datasets/magnatagatune/"},
        "resources": {"image": "ghcr.io/fermata-dev/fermata-trainer:test", "cpu": "500m", "memory": "1Gi"},
        "budget": {"maxUSD": 600},
        "storage": {"checkpoints": "s3://ml-runs/test/"},
        "failures": {"maxRetries": 0},
        # The GPU pod prepares itself: these tests are about the training pod. The default (a
        # preparation pod on CPU capacity first) is tests/e2e/test_preparation.py's.
        "preparation": {"mode": "Trainer"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base
