"""Kueue against the real API server: the queue label reaches the trainer pod, the run is Queued
(not billed, not idle) while the pod is gated, runs once the gate goes, and a Kueue preemption
is an interruption that resumes in a new — again queued — pod.

No Kueue controller runs here. Its part is played by the test: a tiny mutating webhook (an
HTTPS server in this process, registered for this namespace and for pods with the queue-name
label only) adds the ``kueue.x-k8s.io/admission`` gate and the ``kueue.x-k8s.io/managed`` label
at creation, as Kueue's pod webhook does; the test then "admits" by removing the gate and
"preempts" as Kueue's pod controller does (condition ``TerminationTarget``, then delete).
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from fermata_api import contract
from fermata_api.meta import KUEUE_ADMISSION_GATE, KUEUE_QUEUE_LABEL, KUEUE_TERMINATION_CONDITION
from fermata_dev.kubelet import LocalKubelet
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for

pytestmark = pytest.mark.cluster

MANAGED = "kueue.x-k8s.io/managed"


class _Gate(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        req = review["request"]
        pod = req["object"]
        ops: list[dict[str, Any]] = []
        if not pod["spec"].get("schedulingGates"):
            ops.append({"op": "add", "path": "/spec/schedulingGates", "value": []})
        ops.append({"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": KUEUE_ADMISSION_GATE}})
        ops.append({"op": "add", "path": "/metadata/labels/" + MANAGED.replace("/", "~1"), "value": "true"})
        body = json.dumps(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": req["uid"],
                    "allowed": True,
                    "patchType": "JSONPatch",
                    "patch": base64.b64encode(json.dumps(ops).encode()).decode(),
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def kueue_webhook(k8s_api: Any, restricted_namespace: str, tmp_path: Path) -> Iterator[None]:
    """Kueue's pod webhook, as far as gating goes, for this test's namespace."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gate)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    admission = client.AdmissionregistrationV1Api(k8s_api)
    name = f"kueue-standin-{restricted_namespace}"
    admission.create_mutating_webhook_configuration(
        {
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "pods.kueue-standin.fermata.dev",
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{server.server_address[1]}/mutate",
                        "caBundle": base64.b64encode(cert.read_bytes()).decode(),
                    },
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": ["pods"],
                        }
                    ],
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": restricted_namespace}
                    },
                    "objectSelector": {
                        "matchExpressions": [{"key": KUEUE_QUEUE_LABEL, "operator": "Exists"}]
                    },
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 5,
                }
            ],
        }
    )
    try:
        yield
    finally:
        admission.delete_mutating_webhook_configuration(name)
        server.shutdown()


def _pod(runs: Runs, name: str) -> Any:
    return runs.core.read_namespaced_pod(name, runs.ns)


def _queued(runs: Runs, run: str, pod: str) -> Callable[[], Any]:
    def check() -> Any:
        st = runs.status(run)
        c = runs.condition(run, "Queued")
        return (
            st.get("phase") == "Pending"
            and (st.get("pod") or {}).get("name") == pod
            and c is not None
            and c["status"] == "True"
            and st
        )

    return check


def test_a_queued_run_waits_unbilled_runs_when_admitted_and_survives_preemption(
    runs: Runs,
    operator_factory: Callable[..., OperatorProcess],
    kueue_webhook: None,
    kubelet: LocalKubelet,
) -> None:
    operator_factory(runs.ns)
    body = {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": "q", "labels": {KUEUE_QUEUE_LABEL: "team-a"}},
        "spec": spec(idle={"timeout": "5s"}, spot={"backoffSeconds": 1, "fallbackToOnDemandAfter": 0}),
    }
    runs.custom.create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, runs.ns, contract.PLURAL, body
    )
    wait_for(lambda: runs.pods("q"), timeout=30, what="the first pod")
    pod = _pod(runs, "q-0")
    assert pod.metadata.labels[KUEUE_QUEUE_LABEL] == "team-a"
    assert pod.metadata.labels[MANAGED] == "true"
    assert [g.name for g in pod.spec.scheduling_gates] == [KUEUE_ADMISSION_GATE]
    st = wait_for(_queued(runs, "q", "q-0"), timeout=30, what="Queued")
    assert KUEUE_ADMISSION_GATE in (runs.condition("q", "Queued") or {})["message"]
    # Queued for longer than the idle timeout: not billed, not idle, not waiting for capacity.
    time.sleep(7)
    st = runs.status("q")
    assert st["phase"] == "Pending" and _pod(runs, "q-0").spec.node_name is None
    assert st["cost"]["accruedUSD"] == 0 and not st["cost"].get("segments")
    assert runs.condition("q", "Idle") is None and runs.condition("q", "WaitingForCapacity") is None
    # Admission: Kueue removes its gate; the scheduler places the pod, it runs.
    runs.core.patch_namespaced_pod(
        "q-0", runs.ns, [{"op": "replace", "path": "/spec/schedulingGates", "value": []}]
    )
    wait_for(lambda: runs.status("q").get("phase") == "Running", timeout=60, what="Running")
    queued = runs.condition("q", "Queued")
    assert queued is not None and (queued["status"], queued["reason"]) == ("False", "Admitted")
    # Preemption, as Kueue's pod controller does it: TerminationTarget, then delete.
    condition = {
        "type": KUEUE_TERMINATION_CONDITION,
        "status": "True",
        "reason": "StoppedByKueue",
        "message": "Preempted to accommodate a workload due to prioritization in the ClusterQueue",
    }
    runs.core.patch_namespaced_pod_status("q-0", runs.ns, {"status": {"conditions": [condition]}})
    runs.core.delete_namespaced_pod("q-0", runs.ns)
    st = wait_for(_queued(runs, "q", "q-1"), timeout=90, what="the next pod, queued again")
    assert (st["interruptions"], st["failures"]) == (1, 0)
    assert st["lastInterruption"].startswith("KueueStoppedByKueue")
    assert [g.name for g in _pod(runs, "q-1").spec.scheduling_gates] == [KUEUE_ADMISSION_GATE]
