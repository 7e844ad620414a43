"""Carries out reconcile plans against the Kubernetes API (synchronous; called in a thread).

Order matters for restart safety: objects are created first (deterministic names, so a
repeat is a 409), then the status is written, then pods are stopped and finalizers released
— a pod's finalizer is released only after the status that closes its billed span is stored.
"""

from __future__ import annotations

import json
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

from fermata_api import TERMINAL_PHASES, contract
from fermata_api.meta import ANNOTATION_STOP_REASON, LABEL_RUN, OPERATOR_FIELD_MANAGER, POD_FINALIZER
from fermata_api.spec import DEFAULT_PREPARATION_INSTANCE_TYPES
from fermata_operator import metrics, planner, podspec, team_budgets
from fermata_operator.notifier import Notifier
from fermata_operator.price_source import PriceSource
from fermata_operator.settings import OperatorSettings
from fermata_operator.views import NodeView, controller_uid

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


class CreateRefused(Exception):
    """The API server refused one of the run's objects, or its name is held by something else."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def api_message(exc: ApiException) -> str:
    """The API server's own explanation of a refused request (its Status ``message``)."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason or "")[:600]
    except (ValueError, AttributeError, TypeError):
        return str(exc.body or exc.reason or "")[:600]


def _operator_part(status: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (status or {}).items() if k not in planner.TRAINER_KEYS}


def _instance_types(run: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> set[str]:
    """The instance types a run's cost depends on: those it allows and those its pods run on."""
    spec = run.get("spec") or {}
    allowed = list((spec.get("resources") or {}).get("instanceTypes") or [])
    preparation = ((spec.get("preparation") or {}).get("resources") or {}).get("instanceTypes")
    allowed += list(preparation or []) if isinstance(preparation, list) else []
    if not isinstance(preparation, list) and (spec.get("preparation") or {}).get("mode", "Pod") == "Pod":
        allowed += DEFAULT_PREPARATION_INSTANCE_TYPES
    placed = {NodeView.of(n).instance_type for n in nodes.values()}
    return {str(t) for t in allowed if isinstance(t, str)} | {t for t in placed if t}


def _same_grant(want: dict[str, Any], existing: dict[str, Any]) -> bool:
    """A Role grants exactly the rules Fermata renders, a RoleBinding binds exactly its Role to
    its subjects (labels can be copied by anyone; the grant is what matters)."""
    if want["kind"] == "Role":
        return bool(existing.get("rules") == want["rules"])
    if want["kind"] == "RoleBinding":
        return bool(
            existing.get("roleRef") == want["roleRef"] and existing.get("subjects") == want["subjects"]
        )
    return True


@dataclass
class RunController:
    api: client.ApiClient
    settings: OperatorSettings
    prices: PriceSource = field(default_factory=lambda: PriceSource(None, ""))
    #: Our last write of each run, so a stale watch cache never drives a decision.
    _written: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: A new run's first status while it waits for its pod to be placed
    #: (:func:`planner.first_write_hold`), by run: (its UID, the status). The next pass plans
    #: from it as if it were written; lost with the process, which is safe (that pass then finds
    #: the pod by its deterministic name and plans the same status again).
    _held: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)
    _lock: Lock = field(default_factory=Lock)
    #: Posts the run's decisions, budget, idle and failure Events to a webhook (when configured).
    notifier: Notifier | None = None
    #: Namespaces whose trainer identity (ServiceAccount, Role, RoleBinding) is known to be
    #: Fermata's: created or verified once per operator process, not once per run.
    _identities: set[str] = field(default_factory=set)
    #: One creator of a namespace's identity at a time (the burst's other runs wait for it).
    _identity_locks: dict[str, Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        #: Creates a new pod's ServiceAccount and RBAC side by side (then the pod).
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

    def restore(self, run: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``run`` with its operator-owned status restored from our own last write, if someone
        else rewrote it since (only the operator writes those fields; the API server's policy
        refuses anyone else where the chart's admission policies are installed). Returns the run
        to plan from and the fields that had been rewritten."""
        meta = run["metadata"]
        with self._lock:
            mine = self._written.get((meta["namespace"], meta["name"]))
        if mine is None or mine["metadata"].get("uid") != meta.get("uid") or _rv(run) <= _rv(mine):
            return run, []
        ours, theirs = _operator_part(mine.get("status")), _operator_part(run.get("status"))
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if not changed:
            return run, []
        metrics.TAMPERING.labels(namespace=meta["namespace"]).inc()
        log.warning("status tampered", namespace=meta["namespace"], run=meta["name"], fields=changed)
        trainer = {k: v for k, v in (run.get("status") or {}).items() if k in planner.TRAINER_KEYS}
        return {**run, "status": {**ours, **trainer}}, changed

    def let_namespace_go(self, ns: str, operator_finalizer: str) -> None:
        """The namespace is being deleted and everything in it goes: release the cost finalizers of
        its trainer pods and the operator's finalizer of its runs, so nothing of ours holds it
        (kopf stops watching a namespace as it is deleted, and would never release them)."""
        pods = self.core.list_namespaced_pod(ns, label_selector=LABEL_RUN)
        for pod in pods.items:
            if POD_FINALIZER in (pod.metadata.finalizers or []):
                self.release_finalizer(ns, pod.metadata.name, pod.metadata.uid)
        runs = self.custom.list_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, ns, contract.PLURAL
        )
        for run in runs.get("items") or []:
            meta = run.get("metadata") or {}
            fins = list(meta.get("finalizers") or [])
            if operator_finalizer not in fins:
                continue
            # A merge patch replaces the list whole; the resourceVersion makes it conditional.
            body = {
                "metadata": {
                    "finalizers": [f for f in fins if f != operator_finalizer],
                    "resourceVersion": meta.get("resourceVersion"),
                }
            }
            try:
                self.custom.patch_namespaced_custom_object(
                    contract.API_GROUP, contract.API_VERSION, ns, contract.PLURAL, meta["name"], body
                )
            except ApiException as exc:
                if exc.status not in (404, 409, 422):
                    raise
        log.info(
            "namespace being deleted: released its runs and pods",
            namespace=ns,
            runs=len(runs.get("items") or []),
        )

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._written.pop((namespace, name), None)
            self._held.pop((namespace, name), None)

    def observe(
        self,
        run: dict[str, Any],
        pods: list[dict[str, Any]],
        nodes: dict[str, dict[str, Any]],
    ) -> planner.Observed:
        ns = run["metadata"]["namespace"]
        status = run.get("status") or {}
        preparer = status.get("preparer") or {}
        expected_names = [
            (status.get("pod") or {}).get("name"),
            None if preparer.get("prepared") else (preparer.get("pod") or {}).get("name"),
        ]
        names = {p["metadata"]["name"] for p in pods}
        pods = list(pods)
        terminal = status.get("phase") in {p.value for p in TERMINAL_PHASES}
        for expected in expected_names:
            if not expected or expected in names or terminal:
                continue
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
            namespace_terminating=self._namespace_terminating(ns, pods),
        )

    def _namespace_terminating(self, ns: str, pods: list[dict[str, Any]]) -> bool:
        """Asked only when a pod is being deleted by someone else (else it cannot matter): a
        namespace being deleted takes its pods with it, and that is no spot interruption."""
        foreign = [
            p
            for p in pods
            if (p.get("metadata") or {}).get("deletionTimestamp")
            and ANNOTATION_STOP_REASON not in ((p.get("metadata") or {}).get("annotations") or {})
        ]
        if not foreign:
            return False
        try:
            namespace = self.core.read_namespace(ns)
        except ApiException as exc:
            return bool(exc.status == 404)  # no right to look (403): count as usual
        phase = str(getattr(namespace.status, "phase", "") or "")
        return bool(namespace.metadata.deletion_timestamp is not None or phase == "Terminating")

    # ------------------------------------------------------------------ acting

    def reconcile(
        self,
        run: dict[str, Any],
        pods: list[dict[str, Any]],
        nodes: dict[str, dict[str, Any]],
        team: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
    ) -> float | None:
        """One reconcile of one run; returns seconds until it wants to run again (``team``: the
        namespace's TrainingBudgets and TrainingRuns, from the watch caches)."""
        started = time.monotonic()
        run, tampered = self.restore(self.freshest(run))
        ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
        try:
            obs = self.observe(self.with_held(run), pods, nodes)
            obs.tampered = tampered
            if team is not None and team[0]:
                obs.team_budgets = team_budgets.facts_for_run(run, team[0], team[1], obs.now)
            plan = planner.plan(obs, self.settings)
            held = self.execute(run, plan, obs.now)
            metrics.observe_run(run, plan.status)
            if held is not None:
                return held if plan.requeue_after is None else min(held, plan.requeue_after)
            return plan.requeue_after
        except Exception:
            metrics.RECONCILE_ERRORS.labels(namespace=ns).inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            log.debug("reconciled", namespace=ns, run=name, seconds=round(time.monotonic() - started, 4))

    def with_held(self, run: dict[str, Any]) -> dict[str, Any]:
        """``run`` with its held first status in place of the stored one, if one is held and
        nothing has been written since."""
        meta = run["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            held = self._held.get(key)
            if held is None:
                return run
            stored = run.get("status") or {}
            if held[0] != meta.get("uid") or stored.get("pod") or stored.get("phase"):
                del self._held[key]
                return run
        return {**run, "status": {**stored, **held[1]}}

    def execute(self, run: dict[str, Any], plan: planner.Plan, now: datetime) -> float | None:
        """Carries ``plan`` out against ``run`` as stored; returns the seconds its status write
        is held for (None: written, or nothing to write)."""
        ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
        held = None
        try:
            self.create_all(plan.create, run["metadata"].get("uid"))
        except CreateRefused as refused:
            log.warning(
                "create refused", namespace=ns, run=name, reason=refused.reason, message=refused.message
            )
            plan = planner.refused(
                plan, refused.reason, refused.message, run["metadata"].get("generation"), now
            )
        if plan.cleanup:
            self.clean_up(run, plan)  # before the status that says so: a repeat finds 404s
        old = _operator_part(run.get("status"))
        changed = planner.status_changed(old, plan.status, self.settings.cost_write_seconds, now)
        if changed:
            held = planner.first_write_hold(old, plan, self.settings.first_status_hold_seconds, now)
        if held is not None:
            with self._lock:
                self._held[(ns, name)] = (run["metadata"].get("uid", ""), plan.status)
        elif changed:
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
                self._held.pop((ns, name), None)
        for pod_name, reason in plan.stop_pods:
            self.stop_pod(ns, pod_name, reason, plan.uids.get(pod_name))
        for pod_name in plan.release_finalizers:
            unstarted = pod_name in plan.release_if_unstarted
            self.release_finalizer(ns, pod_name, plan.uids.get(pod_name), require_unstarted=unstarted)
        for ev in plan.events:
            self.post_event(run, ev.type, ev.reason, ev.message)
            if self.notifier is not None:
                self.notifier.notify(run, plan.status, ev.type, ev.reason, ev.message)
        if plan.delete_run:
            self.delete_run(run)
        return held

    def create_all(self, objs: list[dict[str, Any]], owner_uid: str | None) -> None:
        """The pod's supporting objects, then the pod, which needs them: a pod exists only once
        everything it uses does. First the namespace's trainer identity — created or verified
        once per namespace by one reconcile while the others wait, then skipped — then the run's
        own objects, then the pod. ServiceAccounts and Roles go side by side; a RoleBinding only
        once its ServiceAccount and the Role are known to be Fermata's, so a name held by
        someone else never gets a grant. A refused create makes the next pod check again."""
        ns = next((o["metadata"]["namespace"] for o in objs), "")
        try:
            self._ensure_identity(ns, [o for o in objs if podspec.is_identity(o)])
            self._create_staged([o for o in objs if not podspec.is_identity(o)], owner_uid)
        except CreateRefused:
            with self._lock:
                self._identities.discard(ns)
            raise

    def _ensure_identity(self, ns: str, objs: list[dict[str, Any]]) -> None:
        if not objs:
            return
        with self._lock:
            if ns in self._identities:
                return
            lock = self._identity_locks.setdefault(ns, Lock())
        with lock:
            with self._lock:
                if ns in self._identities:
                    return  # made by the reconcile we waited for
            self._create_staged(objs, None)
            with self._lock:
                self._identities.add(ns)

    def _create_staged(self, objs: list[dict[str, Any]], owner_uid: str | None) -> None:
        stage = {"ServiceAccount": 0, "Role": 0, "RoleBinding": 1, "Pod": 2}
        for level in (0, 1, 2):
            batch = [o for o in objs if stage[o["kind"]] == level]
            futures = [self._creators.submit(self.ensure, o, owner_uid) for o in batch]
            errors = []
            for future in futures:
                try:
                    future.result()
                except CreateRefused as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]

    def _create(self, obj: dict[str, Any]) -> None:
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        # The answers are not needed: skip deserialising them into client models.
        opts: dict[str, Any] = {"field_manager": OPERATOR_FIELD_MANAGER, "_preload_content": False}
        create = {
            "Pod": self.core.create_namespaced_pod,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
        }[kind]
        _discard(create(ns, obj, **opts))
        if kind == "Pod":
            log.info("pod created", namespace=ns, pod=obj["metadata"]["name"])

    def _existing(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        read = {
            "Pod": self.core.read_namespaced_pod,
            "ServiceAccount": self.core.read_namespaced_service_account,
            "Role": self.rbac.read_namespaced_role,
            "RoleBinding": self.rbac.read_namespaced_role_binding,
        }[kind]
        existing: dict[str, Any] = self.api.sanitize_for_serialization(read(name, ns))
        return existing

    def _is_ours(self, obj: dict[str, Any], existing: dict[str, Any], owner_uid: str | None) -> bool:
        """A run's object: controlled by that run. The namespace's trainer identity: labelled as
        Fermata's identity and owned by no run (a stranger's ``fermata-trainer`` is never used)."""
        if podspec.is_identity(obj):
            labels = (existing.get("metadata") or {}).get("labels") or {}
            labelled = podspec.is_identity(existing) and all(
                labels.get(k) == v for k, v in podspec.identity_labels().items()
            )
            return labelled and _same_grant(obj, existing)
        return owner_uid is not None and controller_uid(existing.get("metadata") or {}) == owner_uid

    def ensure(self, obj: dict[str, Any], owner_uid: str | None) -> None:
        """Create ``obj``; an object of that name is accepted only if it is Fermata's own (see
        :meth:`_is_ours`) — anything else holding the name is never adopted (``NameConflict``)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            self._create(obj)
            return
        except ApiException as exc:
            if exc.status == 409:
                pass
            elif exc.status == 403 and "being terminated" in api_message(exc):
                raise CreateRefused("NamespaceTerminating", api_message(exc)) from exc
            elif exc.status in (400, 403, 413, 422):
                raise CreateRefused("CreateFailed", f"creating {kind} {name}: {api_message(exc)}") from exc
            else:
                raise
        if not self._is_ours(obj, self._existing(obj), owner_uid):
            whose = "Fermata's trainer identity" if podspec.is_identity(obj) else "owned by this TrainingRun"
            raise CreateRefused(
                "NameConflict",
                f"{kind} {ns}/{name} already exists and is not {whose}: "
                f"Fermata never adopts it; delete or rename it (or rename the run)",
            )

    def stop_pod(self, ns: str, pod_name: str, reason: str, uid: str | None) -> None:
        """Mark the pod as stopped on purpose, then delete it (SIGTERM → trainer checkpoints).

        Only the very object the planner saw is touched: the patch carries its UID (a different
        one is refused as immutable) and the delete a UID precondition."""
        if not uid:
            log.warning("pod not stopped: its UID is unknown", namespace=ns, pod=pod_name)
            return
        try:
            self.core.patch_namespaced_pod(
                pod_name,
                ns,
                {"metadata": {"uid": uid, "annotations": {ANNOTATION_STOP_REASON: reason}}},
                field_manager=OPERATOR_FIELD_MANAGER,
            )
            self.core.delete_namespaced_pod(
                pod_name, ns, body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
            )
            log.info("pod stopped", namespace=ns, pod=pod_name, reason=reason)
        except ApiException as exc:
            if exc.status not in (404, 409, 422):  # gone, or not that pod any more
                raise

    def release_finalizer(
        self, ns: str, pod_name: str, uid: str | None = None, *, require_unstarted: bool = False
    ) -> None:
        for _ in range(5):
            try:
                pod = self.core.read_namespaced_pod(pod_name, ns)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            if uid is not None and pod.metadata.uid != uid:
                return  # another pod of that name: not the one whose span was recorded
            if require_unstarted and pod.status is not None and pod.status.start_time is not None:
                return  # it did start: keep it until its span is billed (a later pass sees it)
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

    # ------------------------------------------------------------------ cleanup (ttlSecondsAfterFinished)

    def clean_up(self, run: dict[str, Any], plan: planner.Plan) -> None:
        """Delete a finished run's pods and own RBAC: each only if it is the run's own (a
        pod by the UID the planner saw, the rest by a controller owner reference to the run)."""
        ns, uid = run["metadata"]["namespace"], run["metadata"].get("uid")
        for kind, name in plan.cleanup:
            if kind == "Pod":
                self.stop_pod(ns, name, "CleanedUp", plan.uids.get(name))
            else:
                self.delete_owned(kind, ns, name, uid)
        log.info("run cleaned up", namespace=ns, run=run["metadata"]["name"], objects=len(plan.cleanup))

    def delete_owned(self, kind: str, ns: str, name: str, owner_uid: str | None) -> None:
        """Delete ``kind ns/name`` if the run with ``owner_uid`` controls it (UID precondition: a
        replacement created meanwhile is not touched). Forbidden: logged, never retried hot."""
        read, delete = {
            "ServiceAccount": (
                self.core.read_namespaced_service_account,
                self.core.delete_namespaced_service_account,
            ),
            "Role": (self.rbac.read_namespaced_role, self.rbac.delete_namespaced_role),
            "RoleBinding": (self.rbac.read_namespaced_role_binding, self.rbac.delete_namespaced_role_binding),
        }[kind]
        try:
            meta = self.api.sanitize_for_serialization(read(name, ns)).get("metadata") or {}
            if owner_uid is None or controller_uid(meta) != owner_uid:
                log.info("not deleted: not the run's own", namespace=ns, kind=kind, name=name)
                return
            options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=meta.get("uid")))
            _discard(delete(name, ns, body=options, _preload_content=False))
        except ApiException as exc:
            if exc.status == 403:
                log.warning("cleanup forbidden", namespace=ns, kind=kind, name=name, message=api_message(exc))
            elif exc.status not in (404, 409):
                raise

    def delete_run(self, run: dict[str, Any]) -> None:
        """``spec.cleanup.deleteRun``: delete the TrainingRun itself (that very object)."""
        meta = run["metadata"]
        options = {"preconditions": {"uid": meta.get("uid")}}
        try:
            self.custom.delete_namespaced_custom_object(
                contract.API_GROUP,
                contract.API_VERSION,
                meta["namespace"],
                contract.PLURAL,
                meta["name"],
                body=options,
            )
            log.info("run deleted after its TTL", namespace=meta["namespace"], run=meta["name"])
        except ApiException as exc:
            if exc.status == 403:
                log.warning("run deletion forbidden", namespace=meta["namespace"], run=meta["name"])
            elif exc.status not in (404, 409):
                raise
