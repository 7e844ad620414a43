"""Cleanup after ``spec.ttlSecondsAfterFinished`` and webhook notifications, end to end: the real
API server, the operator process, the test kubelet, and a webhook on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_dev.kubelet import LocalKubelet
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for

pytestmark = pytest.mark.cluster


class Hook:
    """A webhook: the first answer 500 (so the operator retries), then 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                ok = hook.attempts > 1
                if ok:
                    hook.received.append(json.loads(body))
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.server.shutdown()
    h.server.server_close()


def _gone(read: Callable[..., Any], name: str, ns: str) -> bool:
    try:
        read(name, ns)
        return False
    except ApiException as exc:
        return exc.status == 404


def test_a_failed_run_is_notified_then_cleaned_up_and_a_succeeded_one_deleted(
    runs: Runs,
    operator_factory: Callable[..., OperatorProcess],
    restricted_namespace: str,
    kubelet: LocalKubelet,
    hook: Hook,
) -> None:
    operator_factory(
        restricted_namespace,
        FERMATA_NOTIFY_WEBHOOK_URL=hook.url,
        FERMATA_NOTIFY_FORMAT="generic",
        FERMATA_NOTIFY_BACKOFF_SECONDS="0.2",
    )
    kubelet.set_mode("manual")
    # crash has an identity of its own (its ServiceAccount and RoleBinding go with it).
    runs.create(
        "crash", spec(ttlSecondsAfterFinished=2, serviceAccount={"annotations": {"example.com/team": "a"}})
    )
    runs.create("done", spec(ttlSecondsAfterFinished=0, cleanup={"deleteRun": True}))
    for name in ("crash", "done"):
        wait_for(
            lambda n=name: runs.core.read_namespaced_pod(f"{n}-0", runs.ns).spec.node_name,
            timeout=30,
            what=f"{name}-0 bound",
        )
        kubelet.set_running(runs.ns, f"{name}-0")
    kubelet.set_failed(runs.ns, "crash-0", exit_code=1, reason="Error")
    kubelet.set_succeeded(runs.ns, "done-0")

    # The failure reaches the webhook (after one 500), once.
    got = wait_for(lambda: [r for r in hook.received if r["run"]["name"] == "crash"], timeout=30, what="hook")
    assert got[0]["category"] == "failure" and got[0]["phase"] == "Failed"
    assert got[0]["run"]["namespace"] == runs.ns and got[0]["costUSD"] is not None
    assert hook.attempts >= 2

    # Two seconds after it finished, its objects go; its status stays.
    core, rbac = runs.core, client.RbacAuthorizationV1Api(runs.api)
    wait_for(lambda: runs.status("crash").get("cleanedUp"), timeout=30, what="crash cleaned up")
    wait_for(lambda: runs.pods("crash") == [], timeout=30, what="crash pods gone")
    for read in (core.read_namespaced_service_account, rbac.read_namespaced_role_binding):
        assert wait_for(lambda r=read: _gone(r, "crash-trainer", runs.ns), timeout=15, what=str(read))
    # The namespace's trainer identity, shared with the other runs, stays.
    assert core.read_namespaced_service_account("fermata-trainer", runs.ns).metadata.name == "fermata-trainer"
    assert rbac.read_namespaced_role("fermata-trainer", runs.ns).metadata.name == "fermata-trainer"
    st = runs.status("crash")
    assert st["phase"] == "Failed" and st["cost"]["segments"] and st["completionTime"]
    assert runs.condition("crash", "CleanedUp")["status"] == "True"
    assert "CleanedUp" in {e.reason for e in runs.events("crash")}

    # deleteRun: the succeeded run is gone altogether.
    wait_for(lambda: not runs.exists("done"), timeout=30, what="done deleted")
    assert len([r for r in hook.received if r["run"]["name"] == "crash"]) == 1
