"""The operator's own defences against tenants, end to end against the real API server.

No admission policy is installed here (the chart ships them separately): whatever a namespace
admin does to a run's status or to the names the run needs, the operator itself must not be
steered by it. It deletes and bills only the pods it controls, restores its own status when
someone else rewrites it (``Tampered``), never adopts an object that merely has the right name
(``NameConflict``), reports a refused create once instead of retrying hot, does not count a
namespace being deleted as a spot interruption, keeps terminal runs quiet, and restarts a pod
whose resources changed without counting it as an interruption.

The test plays the trainer through the trainer's own ``KubernetesStatusReporter`` (server-side
apply on the status subresource), and the tenant as the cluster admin (plain merge patches).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from fermata_api import RunRef, TrainerProgress, TrainerState, TrainerStatus, parse_time
from fermata_dev.cluster import wait_for_service_account
from fermata_dev.kubelet import LocalKubelet
from fermata_trainer.reporter import KubernetesStatusReporter
from tests.e2e.conftest import GROUP, PLURAL, VERSION, OperatorProcess, Runs, spec, wait_for

pytestmark = pytest.mark.cluster

#: $36/h: one cent per second.
CENT_PER_SECOND = 36.0
PRICES = [
    {"instanceType": "g4dn.xlarge", "capacityType": "spot", "hourlyUSD": CENT_PER_SECOND},
    {"instanceType": "g5.xlarge", "capacityType": "spot", "hourlyUSD": CENT_PER_SECOND},
]
#: Plenty for a namespace holding one run and one pod to go (it takes a few seconds).
NAMESPACE_GONE_SECONDS = 20


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def op(operator_factory: Callable[..., OperatorProcess], restricted_namespace: str) -> OperatorProcess:
    """The operator reconciling every second and writing running totals at most every second."""
    return operator_factory(restricted_namespace, FERMATA_RESYNC_SECONDS="1", FERMATA_COST_WRITE_SECONDS="1")


@pytest.fixture
def steady_op(operator_factory: Callable[..., OperatorProcess], restricted_namespace: str) -> OperatorProcess:
    """Reconciling every second, but (default cost interval) writing nothing in steady state: a
    forgery is then never raced by one of the operator's own routine writes."""
    return operator_factory(restricted_namespace, FERMATA_RESYNC_SECONDS="1")


# ----------------------------------------------------------------------------- helpers


def report(runs: Runs, name: str, step: int, *, state: TrainerState = TrainerState.training) -> None:
    """Report as the trainer does (SSA on status, field manager fermata-trainer)."""
    reporter = KubernetesStatusReporter(RunRef(name=name, namespace=runs.ns), api_client=runs.api)
    progress = TrainerProgress(
        state=state,
        heartbeat_time=datetime.now(UTC),
        pod_name=f"{name}-0",
        step=step,
        total_steps=1000,
        gpu_utilization=0.9,
    )
    reporter.apply(TrainerStatus(progress=progress))


def running(runs: Runs, name: str, pod: str | None = None, timeout: float = 60) -> dict[str, Any]:
    pod = pod or f"{name}-0"
    return wait_for(
        lambda: (s := runs.status(name)).get("phase") == "Running"
        and (s.get("pod") or {}).get("name") == pod
        and s,
        timeout=timeout,
        what=f"{name} Running on {pod}",
    )


def forge(runs: Runs, name: str, status: dict[str, Any]) -> None:
    """What a namespace admin can do without the chart's admission policies: merge-patch the
    status subresource."""
    runs.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, runs.ns, PLURAL, name, {"status": status}
    )


def tampered(runs: Runs, name: str, timeout: float = 15) -> dict[str, Any]:
    cond: dict[str, Any] = wait_for(
        lambda: (c := runs.condition(name, "Tampered")) and c["status"] == "True" and c,
        timeout=timeout,
        what=f"{name}: Tampered=True",
    )
    return cond


def events(runs: Runs, name: str, reason: str) -> list[Any]:
    return [e for e in runs.events(name) if e.reason == reason]


def rv(runs: Runs, name: str) -> str:
    return str(runs.get(name)["metadata"]["resourceVersion"])


def plain_pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod that is none of the operator's business (passes the `restricted` level; no GPU, so
    it takes nothing from the runs; tolerates every taint so that the test kubelet runs it)."""
    hardened = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": "tenant"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "securityContext": {**hardened, "runAsUser": 1000},
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "main",
                    "image": "registry.example.com/tenant/app:1",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                    "securityContext": {
                        **hardened,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def delete_pod_now(runs: Runs, name: str) -> None:
    try:
        runs.core.delete_namespaced_pod(name, runs.ns, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status != 404:
            raise
    wait_for(
        lambda: name not in {p.metadata.name for p in runs.core.list_namespaced_pod(runs.ns).items},
        timeout=30,
        what=f"pod {name} gone",
    )


def log_lines(op: OperatorProcess, since: int = 0) -> list[dict[str, Any]]:
    out = []
    for line in op.log()[since:].splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": line})
    return out


class Recorder:
    """Every ADDED/MODIFIED/DELETED of a watch, in order (a poll could miss a short-lived
    state; a watch sees every version)."""

    def __init__(self, list_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.list_fn, self.args, self.kwargs = list_fn, args, kwargs
        listing = list_fn(*args, _preload_content=False, **kwargs)
        self.rv = json.loads(listing.data)["metadata"]["resourceVersion"]
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(
                    self.list_fn, *self.args, resource_version=self.rv, timeout_seconds=2, **self.kwargs
                ):
                    raw = ev["raw_object"]
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        with self._lock:
                            self.events.append((ev["type"], raw))
                    self.rv = (raw.get("metadata") or {}).get("resourceVersion") or self.rv
                    if self._stop.is_set():
                        w.stop()
                        break
            except Exception as exc:  # recorded and asserted on by the test
                self.errors.append(exc)
                self._stop.wait(0.2)

    def snapshot(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.events)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ----------------------------------------------------------------------------- 1. deletes only its own


def test_a_rewritten_pod_name_deletes_nothing_and_is_restored(
    runs: Runs, steady_op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("own", spec(budget={"maxUSD": 600, "prices": PRICES}))
    st = running(runs, "own")
    real_uid = st["pod"]["uid"]
    victim = runs.core.create_namespaced_pod(runs.ns, plain_pod("victim"))
    try:
        wait_for(
            lambda: runs.core.read_namespaced_pod("victim", runs.ns).status.phase == "Running",
            timeout=20,
            what="victim running",
        )
        forge(runs, "own", {"pod": {"name": "victim"}})
        cond = tampered(runs, "own")
        assert cond["reason"] == "StatusRewritten", cond
        assert "status.pod" in cond["message"], cond
        st = wait_for(
            lambda: (s := runs.status("own"))["pod"]["name"] == "own-0" and s,
            timeout=10,
            what="status.pod.name restored",
        )
        assert st["pod"]["uid"] == real_uid and st["phase"] == "Running"
        warned = events(runs, "own", "StatusTampered")
        assert len(warned) == 1 and warned[0].type == "Warning", [(e.type, e.message) for e in warned]
        assert "status.pod" in warned[0].message
        # Five resyncs later: the victim was never touched, and the run's own pod runs on.
        for _ in range(10):
            pod = runs.core.read_namespaced_pod("victim", runs.ns)
            assert pod.metadata.uid == victim.metadata.uid and pod.metadata.deletion_timestamp is None
            assert "fermata.dev/stop-reason" not in (pod.metadata.annotations or {})
            time.sleep(0.5)
        assert [(p.metadata.name, p.metadata.deletion_timestamp) for p in runs.pods("own")] == [
            ("own-0", None)
        ]
        st = runs.status("own")
        assert st["pod"]["name"] == "own-0" and st["interruptions"] == 0 and st["failures"] == 0
        assert "victim" not in {s["pod"] for s in st["cost"]["segments"]}
    finally:
        delete_pod_now(runs, "victim")


def test_a_labelled_pod_it_does_not_own_is_neither_deleted_nor_billed(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("lab", spec(budget={"maxUSD": 600, "prices": PRICES}))
    running(runs, "lab")
    # Looks like a later incarnation of the run: its labels, no ownerReference to it.
    impostor = plain_pod("lab-7", labels={"fermata.dev/run": "lab", "fermata.dev/incarnation": "7"})
    created = runs.core.create_namespaced_pod(runs.ns, impostor)
    try:
        wait_for(
            lambda: (p := runs.core.read_namespaced_pod("lab-7", runs.ns)).status.phase == "Running"
            and p.status.start_time,
            timeout=20,
            what="impostor running",
        )
        written = set()
        deadline = time.monotonic() + 5  # five reconciles, each allowed to write the cost
        while time.monotonic() < deadline:
            pod = runs.core.read_namespaced_pod("lab-7", runs.ns)
            assert pod.metadata.uid == created.metadata.uid and pod.metadata.deletion_timestamp is None
            assert "fermata.dev/stop-reason" not in (pod.metadata.annotations or {})
            cost = runs.status("lab")["cost"]
            assert "lab-7" not in {s["pod"] for s in cost["segments"]}, cost["segments"]
            assert cost["hourlyRateUSD"] == CENT_PER_SECOND, cost  # one pod billed, not two
            written.add(cost["updated"])
            time.sleep(0.5)
        assert len(written) >= 3, f"the cost was not rewritten while we watched: {written}"
        st = runs.status("lab")
        assert [s["pod"] for s in st["cost"]["segments"]] == ["lab-0"]
        assert st["pod"]["name"] == "lab-0" and st["phase"] == "Running"
    finally:
        delete_pod_now(runs, "lab-7")


# ----------------------------------------------------------------------------- 2. forged cost


def test_a_forged_cost_is_restored_to_the_real_figure(
    runs: Runs, steady_op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("ledger", spec(budget={"maxUSD": 600, "prices": PRICES}))
    running(runs, "ledger")
    time.sleep(3)  # three cents spent
    pod = runs.core.read_namespaced_pod("ledger-0", runs.ns)
    started = pod.status.start_time
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    forged_segment = {
        "pod": "ledger-0",
        "node": pod.spec.node_name,
        "instanceType": "g4dn.xlarge",
        "capacityType": "spot",
        "start": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end": now,
        "hourlyUSD": 0,
        "usd": 0,
    }
    forge(runs, "ledger", {"cost": {"segments": [forged_segment], "accruedUSD": 0, "remainingUSD": 600}})
    cond = tampered(runs, "ledger")
    assert cond["reason"] == "StatusRewritten" and "status.cost" in cond["message"], cond
    assert any("status.cost" in e.message for e in events(runs, "ledger", "StatusTampered"))
    st = wait_for(
        lambda: (s := runs.status("ledger"))["cost"]["accruedUSD"] > 0 and s,
        timeout=10,
        what="accrued cost restored",
    )
    cost = st["cost"]
    # The forged closed $0 span is gone: ledger-0 is billed as the open span it is.
    assert [(s["pod"], s.get("end"), s["hourlyUSD"]) for s in cost["segments"]] == [
        ("ledger-0", None, CENT_PER_SECOND)
    ], cost["segments"]
    assert cost["hourlyRateUSD"] == CENT_PER_SECOND
    updated = parse_time(cost["updated"])
    assert updated is not None
    expected = (updated - started).total_seconds() * CENT_PER_SECOND / 3600
    assert expected > 0.03
    assert cost["accruedUSD"] == pytest.approx(expected, abs=0.01), (cost, expected)
    assert cost["remainingUSD"] == pytest.approx(600 - cost["accruedUSD"], abs=1e-3)
    # The pod still holds its cost finalizer: a closed span would have let it go unbilled.
    finalizers = runs.core.read_namespaced_pod("ledger-0", runs.ns).metadata.finalizers or []
    assert "fermata.dev/cost-accounting" in finalizers


# ----------------------------------------------------------------------------- 3. resurrection


def test_a_run_stopped_by_its_budget_cannot_be_resurrected_through_its_status(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create("spent", spec(budget={"maxUSD": 0.01, "prices": PRICES}))
    wait_for(lambda: runs.status("spent").get("phase") == "BudgetExceeded", timeout=40, what="BudgetExceeded")
    # Nobody answers the stop request: the pod is SIGTERMed and released once its span is closed.
    wait_for(lambda: runs.pods("spent") == [], timeout=30, what="the pod stopped and released")
    wait_for(
        lambda: (s := runs.status("spent"))["cost"]["segments"]
        and all(seg.get("end") for seg in s["cost"]["segments"]),
        timeout=10,
        what="closed span",
    )
    time.sleep(1.5)  # let the last writes land
    before = runs.status("spent")
    assert before["cost"]["accruedUSD"] >= 0.01  # the budget was spent
    created = len(events(runs, "spent", "PodCreated"))
    assert created == 1

    forge(runs, "spent", {"phase": "Pending", "cost": {"segments": [], "accruedUSD": 0}, "interruptions": 0})
    cond = tampered(runs, "spent")
    assert cond["reason"] == "StatusRewritten"
    assert "status.phase" in cond["message"] and "status.cost" in cond["message"], cond
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert runs.pods("spent") == [], [p.metadata.name for p in runs.pods("spent")]
        time.sleep(0.25)
    st = runs.status("spent")
    assert st["phase"] == "BudgetExceeded", st.get("phase")
    assert st["cost"]["segments"] == before["cost"]["segments"]
    assert st["cost"]["accruedUSD"] == before["cost"]["accruedUSD"]
    assert st["interruptions"] == before["interruptions"] and st["incarnation"] == before["incarnation"]
    assert len(events(runs, "spent", "PodCreated")) == created
    assert len(events(runs, "spent", "StatusTampered")) == 1
    with pytest.raises(ApiException) as gone:
        runs.core.read_namespaced_pod("spent-1", runs.ns)
    assert gone.value.status == 404


# ----------------------------------------------------------------------------- 4. never adopt a name


def test_a_name_held_by_someone_else_is_never_adopted(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    core, rbac = runs.core, client.RbacAuthorizationV1Api(runs.api)
    ns = runs.ns
    tenant_rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete"]}]
    # The namespace's trainer Role's name, held by the tenant with rules of her own — and even
    # with the labels of Fermata's identity (labels are anyone's to copy; the grant is checked).
    identity_labels = {
        "app.kubernetes.io/name": "fermata",
        "app.kubernetes.io/component": "trainer-identity",
        "app.kubernetes.io/managed-by": "fermata-operator",
    }
    role = rbac.create_namespaced_role(
        ns, {"metadata": {"name": "fermata-trainer", "labels": identity_labels}, "rules": tenant_rules}
    )
    runs.create("nc", spec())
    _assert_blocked_once(runs, op, "nc", f"Role {ns}/fermata-trainer")
    role_now = rbac.read_namespaced_role("fermata-trainer", ns)
    assert role_now.metadata.resource_version == role.metadata.resource_version
    assert [r.to_dict() for r in role_now.rules] == [r.to_dict() for r in role.rules]
    assert not role_now.metadata.owner_references
    # Nothing was bound to the tenant's Role (the trainer ServiceAccount would have gained it).
    assert [b.metadata.name for b in rbac.list_namespaced_role_binding(ns).items] == []
    # The tenant lets the name go; a run with an identity of its own (spec.serviceAccount
    # annotations: its own <run>-trainer ServiceAccount) finds that name held instead.
    rbac.delete_namespaced_role("fermata-trainer", ns)
    sa = core.create_namespaced_service_account(ns, {"metadata": {"name": "nc2-trainer"}})
    runs.create("nc2", spec(serviceAccount={"annotations": {"example.com/team": "audio"}}))
    _assert_blocked_once(runs, op, "nc2", f"ServiceAccount {ns}/nc2-trainer")
    sa_now = core.read_namespaced_service_account("nc2-trainer", ns)
    assert sa_now.metadata.resource_version == sa.metadata.resource_version
    assert not sa_now.metadata.owner_references and not sa_now.metadata.annotations
    # The namespace's identity is Fermata's now (created for nc2 before its own objects).
    assert rbac.read_namespaced_role("fermata-trainer", ns).metadata.labels[
        "app.kubernetes.io/component"
    ] == ("trainer-identity")
    # Nor is the tenant's ServiceAccount given rights: no binding names it (the trainer Role
    # would make it able to write runs' status).
    granted = [
        f"RoleBinding {b.metadata.name} binds Role {b.role_ref.name} to "
        + ", ".join(f"{x.kind} {x.name}" for x in b.subjects or [])
        for b in rbac.list_namespaced_role_binding(ns).items
        if any(x.kind == "ServiceAccount" and x.name == "nc2-trainer" for x in b.subjects or [])
    ]
    assert not granted, granted


def _assert_blocked_once(runs: Runs, op: OperatorProcess, name: str, obj: str) -> None:
    """``name`` is refused with NameConflict naming ``obj``: one Warning, one log line, no pod,
    and its status is not rewritten while blocked."""
    accepted = wait_for(
        lambda: (c := runs.condition(name, "Accepted")) and c["status"] == "False" and c,
        timeout=20,
        what=f"{name}: Accepted=False",
    )
    assert accepted["reason"] == "NameConflict", accepted
    assert obj in accepted["message"], accepted
    version = rv(runs, name)
    time.sleep(5)  # five resyncs
    conflicts = events(runs, name, "NameConflict")
    assert len(conflicts) == 1, (name, [(e.type, e.message) for e in conflicts])
    assert conflicts[0].type == "Warning" and obj in conflicts[0].message
    assert not events(runs, name, "PodCreated"), name
    assert runs.pods(name) == [], name
    st = runs.status(name)
    assert st["phase"] == "Pending" and (st.get("creationBlocked") or {}).get("reason") == "NameConflict"
    assert rv(runs, name) == version, f"{name}: status rewritten while blocked"
    refusals = [
        line for line in log_lines(op) if line.get("event") == "create refused" and line.get("run") == name
    ]
    assert len(refusals) == 1, (name, refusals)


# ----------------------------------------------------------------------------- 5. creation refused


def test_a_refused_create_is_reported_once_and_not_retried_hot(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.core.create_namespaced_resource_quota(
        runs.ns, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    )
    # The harness runs no resourcequota controller: write the status it would (the API server's
    # quota admission enforces status.hard; without it every pod is refused as "status unknown").
    runs.core.patch_namespaced_resource_quota_status(
        "no-pods", runs.ns, {"status": {"hard": {"pods": "0"}, "used": {"pods": "0"}}}
    )
    runs.create("q", spec())
    accepted = wait_for(
        lambda: (c := runs.condition("q", "Accepted")) and c["status"] == "False" and c,
        timeout=20,
        what="Accepted=False",
    )
    assert accepted["reason"] == "CreateFailed", accepted
    # The API server's own words.
    assert "exceeded quota: no-pods" in accepted["message"] and "pods=0" in accepted["message"], accepted
    version = rv(runs, "q")
    time.sleep(4)
    refused = events(runs, "q", "CreateFailed")
    assert len(refused) == 1, [(e.type, e.message) for e in refused]
    assert refused[0].type == "Warning" and "exceeded quota: no-pods" in refused[0].message
    assert runs.pods("q") == []
    assert rv(runs, "q") == version, "status rewritten while blocked"
    refusals = [
        line for line in log_lines(op) if line.get("event") == "create refused" and line.get("run") == "q"
    ]
    assert len(refusals) == 1, refusals
    st = runs.status("q")
    assert st["phase"] == "Pending" and st["creationBlocked"]["reason"] == "CreateFailed"


# ----------------------------------------------------------------------------- 6. namespace deletion


def test_deleting_the_namespace_is_not_an_interruption(
    k8s_api: Any,
    operator_factory: Callable[..., OperatorProcess],
    kubelet: LocalKubelet,
) -> None:
    ns = f"tenant-nsdel-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s_api)
    core.create_namespace({"metadata": {"name": ns}})
    runs = Runs(k8s_api, ns)
    try:
        wait_for_service_account(k8s_api, ns)
        op = operator_factory(ns, FERMATA_RESYNC_SECONDS="1", FERMATA_COST_WRITE_SECONDS="1")
        runs.create("gone", spec(budget={"maxUSD": 600, "prices": PRICES}))
        running(runs, "gone")
        report(runs, "gone", 10)
        since = len(op.log())
        run_watch = Recorder(
            runs.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            ns,
            PLURAL,
            field_selector="metadata.name=gone",
        )
        pod_watch = Recorder(core.list_namespaced_pod, ns)
        try:
            core.delete_namespace(ns)
            deadline = time.monotonic() + NAMESPACE_GONE_SECONDS
            while time.monotonic() < deadline and not any(t == "DELETED" for t, _ in run_watch.snapshot()):
                time.sleep(0.2)
        finally:
            run_watch.stop()
            pod_watch.stop()
        assert not run_watch.errors and not pod_watch.errors, (run_watch.errors, pod_watch.errors)
        # Every version of the run, up to its deletion: nothing counted, nothing replaced.
        versions = [
            (t, (o.get("status") or {}).get("interruptions"), (o.get("status") or {}).get("failures"))
            for t, o in run_watch.snapshot()
        ]
        assert versions, "no version of the run seen"
        assert all(i == 0 and f == 0 for _, i, f in versions), versions
        pods = {o["metadata"]["name"] for _, o in pod_watch.snapshot()}
        assert pods == {"gone-0"}, pods
        lines = log_lines(op, since)
        assert not [line for line in lines if "Traceback" in json.dumps(line)], [
            line for line in lines if "Traceback" in json.dumps(line)
        ]
        bad = [line for line in lines if line.get("event") in ("reconcile crashed", "pod created")]
        assert not bad, bad
        # And the run goes with its namespace (the operator's own finalizer must not hold it).
        if not any(t == "DELETED" for t, _ in run_watch.snapshot()):
            left = runs.get("gone")["metadata"]
            namespace = core.read_namespace(ns)
            held = [(p.metadata.name, p.metadata.finalizers) for p in core.list_namespaced_pod(ns).items]
            raise AssertionError(
                f"the run outlived its namespace's deletion by {NAMESPACE_GONE_SECONDS} s: deletionTimestamp="
                f"{left.get('deletionTimestamp')} finalizers={left.get('finalizers')}; pods left: {held}; namespace "
                f"{namespace.status.phase}: "
                + "; ".join(f"{c.type}={c.status} {c.message}" for c in namespace.status.conditions or [])
                + "\noperator log since the deletion:\n"
                + "\n".join(json.dumps(line) for line in lines)[-3000:]
            )
    finally:
        _force_namespace_away(runs, ns)


def _force_namespace_away(runs: Runs, ns: str, timeout: float = 30) -> None:
    """Never leave a namespace stuck in Terminating behind: drop whatever finalizers hold it."""
    with contextlib.suppress(ApiException):
        runs.core.delete_namespace(ns)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            runs.core.read_namespace(ns)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        for pod in runs.core.list_namespaced_pod(ns).items:
            if pod.metadata.finalizers:
                with contextlib.suppress(ApiException):
                    runs.core.patch_namespaced_pod(
                        pod.metadata.name, ns, [{"op": "remove", "path": "/metadata/finalizers"}]
                    )
        for run in runs.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
            if run["metadata"].get("finalizers"):
                with contextlib.suppress(ApiException):
                    runs.custom.patch_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        ns,
                        PLURAL,
                        run["metadata"]["name"],
                        {"metadata": {"finalizers": None}},
                    )
        time.sleep(0.5)


# ----------------------------------------------------------------------------- 7. terminal runs


def test_a_completed_run_writes_nothing(runs: Runs, op: OperatorProcess, kubelet: LocalKubelet) -> None:
    runs.create("done", spec(budget={"maxUSD": 600, "prices": PRICES}))
    running(runs, "done")
    report(runs, "done", 1000, state=TrainerState.completed)
    kubelet.set_succeeded(runs.ns, "done-0")
    st = wait_for(
        lambda: (s := runs.status("done")).get("phase") == "Succeeded" and s, timeout=30, what="Succeeded"
    )
    assert st["decision"] and st.get("completionTime")
    wait_for(
        lambda: "fermata.dev/cost-accounting"
        not in (runs.core.read_namespaced_pod("done-0", runs.ns).metadata.finalizers or []),
        timeout=20,
        what="cost finalizer released",
    )
    wait_for(
        lambda: all(s.get("end") for s in runs.status("done")["cost"]["segments"]),
        timeout=10,
        what="span closed",
    )
    time.sleep(1.5)  # the last write lands
    version = rv(runs, "done")
    seen = len(runs.events("done"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = runs.get("done")
        assert now["metadata"]["resourceVersion"] == version, (
            "a terminal run was written again: " + json.dumps(now.get("status"), default=str)[:1500]
        )
        time.sleep(0.5)
    assert len(runs.events("done")) == seen
    assert runs.status("done")["phase"] == "Succeeded"


# ----------------------------------------------------------------------------- 8. spec change


def test_changing_the_instance_types_restarts_the_pod_without_counting_an_interruption(
    runs: Runs, op: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.create(
        "respec", spec(resources={"instanceTypes": ["g4dn.xlarge"]}, budget={"maxUSD": 600, "prices": PRICES})
    )
    running(runs, "respec")
    pods = Recorder(runs.core.list_namespaced_pod, runs.ns, label_selector="fermata.dev/run=respec")
    try:
        runs.patch_spec("respec", {"resources": {"instanceTypes": ["g4dn.xlarge", "g5.xlarge"]}})
        st = running(runs, "respec", "respec-1", timeout=40)
    finally:
        pods.stop()
    assert not pods.errors, pods.errors
    seen = pods.snapshot()
    first_deleting = next(
        i
        for i, (_, o) in enumerate(seen)
        if o["metadata"]["name"] == "respec-0" and o["metadata"].get("deletionTimestamp")
    )
    first_new = next(i for i, (_, o) in enumerate(seen) if o["metadata"]["name"] == "respec-1")
    assert first_deleting < first_new, [
        (t, o["metadata"]["name"], o["metadata"].get("deletionTimestamp")) for t, o in seen
    ]
    old = seen[first_deleting][1]
    assert old["metadata"]["annotations"]["fermata.dev/stop-reason"] == "SpecChanged"
    new = seen[first_new][1]
    affinity = json.dumps(new["spec"]["affinity"])
    assert "g5.xlarge" in affinity and "g4dn.xlarge" in affinity
    assert st["interruptions"] == 0 and st["failures"] == 0 and st["incarnation"] == 1
    changed = events(runs, "respec", "SpecChanged")
    assert len(changed) == 1 and "respec-0" in changed[0].message, [e.message for e in changed]
    assert runs.condition("respec", "Interrupted") is None
    time.sleep(2)
    st = runs.status("respec")
    assert st["interruptions"] == 0 and st["failures"] == 0 and st["phase"] == "Running"
    assert [s["pod"] for s in st["cost"]["segments"]] == ["respec-0", "respec-1"]
