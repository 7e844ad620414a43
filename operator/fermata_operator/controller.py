"""Carries out reconcile plans against the Kubernetes API (synchronous; called in a thread).

Order matters for restart safety: objects are created first (deterministic names, so a
repeat is a 409), then the status is written, then pods are stopped and finalizers released
— a pod's finalizer is released only after the status that closes its billed span is stored.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from threading import Lock
from typing import Any

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_api import contract
from fermata_api.meta import ANNOTATION_STOP_REASON, OPERATOR_FIELD_MANAGER, POD_FINALIZER
from fermata_operator import metrics, planner
from fermata_operator.price_source import PriceSource
from fermata_operator.settings import OperatorSettings
from fermata_operator.views import NodeView

log = structlog.get_logger("fermata.controller")


def _discard(resp: Any) -> None:
    """Drain and release a ``_preload_content=False`` response (its body is not needed)."""
    resp.read()
    resp.release_conn()


def _rv(obj: dict[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _instance_types(run: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> set[str]:
    """The instance types a run's cost depends on: those it allows and those its pods run on."""
    allowed = ((run.get("spec") or {}).get("resources") or {}).get("instanceTypes") or []
    placed = {NodeView.of(n).instance_type for n in nodes.values()}
    return {str(t) for t in allowed if isinstance(t, str)} | {t for t in placed if t}


@dataclass
class RunController:
    api: client.ApiClient
    settings: OperatorSettings
    prices: PriceSource = field(default_factory=lambda: PriceSource(None, ""))
    #: Our last write of each run, so a stale watch cache never drives a decision.
    _written: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _lock: Lock = field(default_factory=Lock)

    def __post_init__(self) -> None:
        #: Creates a new pod's ConfigMap, ServiceAccount and RBAC side by side (then the pod).
        self._creators = ThreadPoolExecutor(
            max_workers=max(4, self.settings.workers), thread_name_prefix="fermata-create"
        )
        self.core = client.CoreV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    # ------------------------------------------------------------------ observing

    def freshest(self, run: dict[str, Any]) -> dict[str, Any]:
        key = (run["metadata"]["namespace"], run["metadata"]["name"])
        with self._lock:
            mine = self._written.get(key)
        if (
            mine is not None
            and mine["metadata"].get("uid") == run["metadata"].get("uid")
            and _rv(mine) > _rv(run)
        ):
            return mine
        return run

    def is_own_write(self, run: dict[str, Any]) -> bool:
        """Whether ``run`` is exactly the version our last status write produced (its watch event
        brings nothing new, so it need not wake the run's loop)."""
        meta = run.get("metadata") or {}
        with self._lock:
            mine = self._written.get((meta.get("namespace"), meta.get("name")))  # type: ignore[arg-type]
        return (
            mine is not None
            and mine["metadata"].get("uid") == meta.get("uid")
            and _rv(mine) == _rv(run)
            and _rv(run) > 0
        )

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._written.pop((namespace, name), None)

    def observe(
        self,
        run: dict[str, Any],
        pods: list[dict[str, Any]],
        nodes: dict[str, dict[str, Any]],
    ) -> planner.Observed:
        ns = run["metadata"]["namespace"]
        status = run.get("status") or {}
        expected = (status.get("pod") or {}).get("name")
        names = {p["metadata"]["name"] for p in pods}
        pods = list(pods)
        if expected and expected not in names:
            # The watch cache may lag our own create: ask the API before believing it is gone.
            try:
                pod = self.api.sanitize_for_serialization(self.core.read_namespaced_pod(expected, ns))
                pods.append(pod)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        missing: set[str] = set()
        nodes = dict(nodes)
        for pod in pods:
            node_name = (pod.get("spec") or {}).get("nodeName")
            if node_name and node_name not in nodes:
                try:
                    nodes[node_name] = self.api.sanitize_for_serialization(self.core.read_node(node_name))
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    missing.add(node_name)
        return planner.Observed(
            run=run,
            pods=pods,
            nodes=nodes,
            missing_nodes=missing,
            prices=self.prices.snapshot(_instance_types(run, nodes)),
            now=datetime.now(UTC),
        )

    # ------------------------------------------------------------------ acting

    def reconcile(
        self,
        run: dict[str, Any],
        pods: list[dict[str, Any]],
        nodes: dict[str, dict[str, Any]],
    ) -> float | None:
        """One reconcile of one run; returns seconds until it wants to run again."""
        started = time.monotonic()
        run = self.freshest(run)
        ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
        try:
            obs = self.observe(run, pods, nodes)
            plan = planner.plan(obs, self.settings)
            self.execute(run, plan, obs.now)
            metrics.observe_run(run, plan.status)
            return plan.requeue_after
        except Exception:
            metrics.RECONCILE_ERRORS.labels(namespace=ns).inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            log.debug("reconciled", namespace=ns, run=name, seconds=round(time.monotonic() - started, 4))

    def execute(self, run: dict[str, Any], plan: planner.Plan, now: datetime) -> None:
        ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
        self.create_all(plan.create)
        old = {k: v for k, v in (run.get("status") or {}).items() if k not in planner.TRAINER_KEYS}
        if planner.status_changed(old, plan.status, self.settings.cost_write_seconds, now):
            body = planner.merge_patch(old, plan.status)
            written = self.custom.patch_namespaced_custom_object_status(
                contract.API_GROUP,
                contract.API_VERSION,
                ns,
                contract.PLURAL,
                name,
                {"status": body},
                field_manager=OPERATOR_FIELD_MANAGER,
            )
            with self._lock:
                self._written[(ns, name)] = written
        for pod_name, reason in plan.stop_pods:
            self.stop_pod(ns, pod_name, reason)
        for pod_name in plan.release_finalizers:
            self.release_finalizer(ns, pod_name)
        for ev in plan.events:
            self.post_event(run, ev.type, ev.reason, ev.message)

    def create_all(self, objs: list[dict[str, Any]]) -> None:
        """The pod's supporting objects at once (they do not depend on each other), then the pod,
        which needs them: a pod exists only once everything it uses does."""
        support = [o for o in objs if o["kind"] != "Pod"]
        if len(support) > 1:
            for future in [self._creators.submit(self.ensure, o) for o in support]:
                future.result()  # re-raises the first failure (the others still complete)
        else:
            for obj in support:
                self.ensure(obj)
        for obj in objs:
            if obj["kind"] == "Pod":
                self.ensure(obj)

    def ensure(self, obj: dict[str, Any]) -> None:
        kind = obj["kind"]
        ns = obj["metadata"]["namespace"]
        # The answers are not needed: skip deserialising them into client models.
        opts: dict[str, Any] = {"field_manager": OPERATOR_FIELD_MANAGER, "_preload_content": False}
        try:
            if kind == "Pod":
                _discard(self.core.create_namespaced_pod(ns, obj, **opts))
                log.info("pod created", namespace=ns, pod=obj["metadata"]["name"])
            elif kind == "ConfigMap":
                _discard(self.core.create_namespaced_config_map(ns, obj, **opts))
            elif kind == "ServiceAccount":
                _discard(self.core.create_namespaced_service_account(ns, obj, **opts))
            elif kind == "Role":
                _discard(self.rbac.create_namespaced_role(ns, obj, **opts))
            elif kind == "RoleBinding":
                _discard(self.rbac.create_namespaced_role_binding(ns, obj, **opts))
            else:  # pragma: no cover - programming error
                raise ValueError(f"cannot create {kind}")
        except ApiException as exc:
            if exc.status != 409:
                raise
            if kind == "ConfigMap":
                # The spec may have changed: the next pod reads the new configuration.
                _discard(
                    self.core.patch_namespaced_config_map(
                        obj["metadata"]["name"], ns, {"data": obj["data"]}, **opts
                    )
                )

    def stop_pod(self, ns: str, pod_name: str, reason: str) -> None:
        """Mark the pod as stopped on purpose, then delete it (SIGTERM → trainer checkpoints)."""
        try:
            self.core.patch_namespaced_pod(
                pod_name,
                ns,
                {"metadata": {"annotations": {ANNOTATION_STOP_REASON: reason}}},
                field_manager=OPERATOR_FIELD_MANAGER,
            )
            self.core.delete_namespaced_pod(pod_name, ns)
            log.info("pod stopped", namespace=ns, pod=pod_name, reason=reason)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def release_finalizer(self, ns: str, pod_name: str) -> None:
        for _ in range(5):
            try:
                pod = self.core.read_namespaced_pod(pod_name, ns)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            fins = list(pod.metadata.finalizers or [])
            if POD_FINALIZER not in fins:
                return
            kept = [f for f in fins if f != POD_FINALIZER]
            # A JSON patch (a strategic merge would *merge* the finalizer list), guarded by a
            # test so a concurrent change to the list makes us re-read instead of clobbering it.
            ops = [
                {"op": "test", "path": "/metadata/finalizers", "value": fins},
                {"op": "replace", "path": "/metadata/finalizers", "value": kept},
            ]
            try:
                self.core.patch_namespaced_pod(pod_name, ns, ops, field_manager=OPERATOR_FIELD_MANAGER)
                log.debug("finalizer released", namespace=ns, pod=pod_name)
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status not in (409, 422):  # 422: the test op failed (list changed)
                    raise

    def post_event(self, run: dict[str, Any], etype: str, reason: str, message: str) -> None:
        meta = run["metadata"]
        now = datetime.now(UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
                "kind": contract.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": etype,
            "source": {"component": OPERATOR_FIELD_MANAGER},
            "reportingComponent": OPERATOR_FIELD_MANAGER,
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            _discard(self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False))
        except ApiException as exc:  # events are best effort
            log.warning("event not posted", reason=reason, status=exc.status)
        metrics.DECISIONS.labels(namespace=meta["namespace"], reason=reason).inc()
        log.info(
            "event", namespace=meta["namespace"], run=meta["name"], type=etype, reason=reason, message=message
        )

    def release_orphan(self, pod: dict[str, Any]) -> None:
        """A pod whose run is gone or going: nothing to bill any more, let it go."""
        self.release_finalizer(pod["metadata"]["namespace"], pod["metadata"]["name"])

    def run_exists(self, ns: str, name: str) -> bool:
        try:
            obj = self.custom.get_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, ns, contract.PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return not (obj.get("metadata") or {}).get("deletionTimestamp")
