"""kopf wiring: one long-lived reconcile loop per TrainingRun, woken by pod and run events.

The loop (a kopf daemon) runs :meth:`RunController.reconcile` in a thread whenever the run or
one of its pods changes, when a policy clock is due (budget crossing, idle timeout, gate time,
retry backoff), and at least every ``FERMATA_RESYNC_SECONDS``. Pods and nodes come from kopf
indices (watch caches), so an idle run costs no API reads; the echo of the operator's own status
write does not wake the loop again. At most ``FERMATA_WORKERS`` reconciles run at once, and runs
that have no live pod go first (:class:`ReconcileGate`), so a burst of new runs gets its pods
before status updates catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
import structlog
import urllib3
from kubernetes.client.exceptions import ApiException

from fermata_api import contract
from fermata_api.meta import BUDGET_PLURAL, LABEL_RUN, POD_FINALIZER
from fermata_operator import metrics
from fermata_operator.controller import RunController, api_message
from fermata_operator.kube import api_client
from fermata_operator.notifier import Notifier
from fermata_operator.price_source import PriceSource
from fermata_operator.settings import OperatorSettings
from fermata_operator.team_budgets import BudgetController
from fermata_operator.views import NodeView

log = structlog.get_logger("fermata.handlers")
RESOURCE = (contract.API_GROUP, contract.API_VERSION, contract.PLURAL)
_WAKERS: dict[tuple[str, str], asyncio.Event] = {}
BUDGETS = (contract.API_GROUP, contract.API_VERSION, BUDGET_PLURAL)
#: One loop per namespace with TrainingBudgets (no kopf daemon: those would need a finalizer).
_BUDGET_WAKERS: dict[str, asyncio.Event] = {}
_BUDGET_LOOPS: dict[str, asyncio.Task[None]] = {}
#: kopf's finalizer on each TrainingRun (it keeps a run until its daemon has stopped).
OPERATOR_FINALIZER = "fermata.dev/operator"


class ReconcileGate:
    """Lets at most ``limit`` reconciles run at once; when runs wait, those that have no live pod
    (new runs, replacements after an interruption) go before those that only refresh status.

    With many runs created at once, the pods come first and status writes catch up after.
    """

    URGENT, NORMAL = 0, 1

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)  # hand the slot over
                return
        self.free += 1


class SlimDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff-base, built without deep-copying what it throws away.

    kopf computes an object's "essence" on every event: a deep copy of the whole body, from
    which it then deletes ``metadata`` (but labels and annotations) and ``status``. A run's
    status (cost segments, conditions, evaluations) and its managedFields make that copy the
    largest CPU cost of a burst of runs. The essence is the same when only what survives is
    copied; with handlers that ask for extra fields (none here) kopf's own way is kept."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        raw = dict(body)
        meta = raw.get("metadata") or {}
        slim = {k: v for k, v in raw.items() if k not in ("status", "metadata")}
        slim["metadata"] = {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta}
        return super().build(body=kopf.Body(cast(kopf.RawBody, slim)), extra_fields=extra_fields)


def watch_only_ours(settings: kopf.OperatorSettings, opsettings: OperatorSettings) -> None:
    """Server-side label selectors: the API server sends only Fermata's pods and the nodes its
    pods can land on, so neither the watch traffic nor kopf's per-object work grows with the
    unrelated pods and nodes of the cluster."""
    settings.watching.label_selectors["", "v1", "pods"] = LABEL_RUN
    if opsettings.node_label_selector:
        settings.watching.label_selectors["", "v1", "nodes"] = opsettings.node_label_selector
    log.info("watching", pods=LABEL_RUN, nodes=opsettings.node_label_selector or "all")


def _controller(memo: Any) -> RunController:
    ctl: RunController = memo["controller"]
    return ctl


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = OPERATOR_FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fermata.dev")
    settings.persistence.diffbase_storage = SlimDiffBaseStorage(
        prefix="fermata.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    opsettings = OperatorSettings.from_env()
    watch_only_ours(settings, opsettings)
    # Reconciles run the synchronous client in threads: size the pool (and the client's
    # connection pool) for many runs instead of asyncio's default of cores + 4.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=opsettings.workers + 4, thread_name_prefix="fermata-reconcile")
    )
    ctl = RunController(api=api_client(pool_size=2 * opsettings.workers), settings=opsettings)
    ctl.prices = price_source(ctl, opsettings)
    if opsettings.notify_webhook_url:
        ctl.notifier = Notifier(
            opsettings.notify_webhook_url,
            opsettings.notify_format,
            opsettings.notify_events,
            backoff_seconds=opsettings.notify_backoff_seconds,
        )
        log.info(
            "webhook notifications enabled", format=opsettings.notify_format, events=opsettings.notify_events
        )
    await asyncio.to_thread(ctl.prices.table)
    memo["controller"] = ctl
    memo["budgets"] = BudgetController(ctl.api, cost_write_seconds=opsettings.cost_write_seconds)
    memo["gate"] = ReconcileGate(opsettings.workers)
    port = int(os.environ.get("FERMATA_METRICS_PORT", "0") or 0)
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
    log.info("operator started", resync=opsettings.resync_seconds, price_table=opsettings.price_table)


def price_source(ctl: RunController, opsettings: OperatorSettings) -> PriceSource:
    live = None
    if opsettings.aws_pricing:
        from fermata_operator.aws_prices import CachedPrices, boto3_fetcher

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        live = CachedPrices(boto3_fetcher(region))
        log.info("live AWS prices enabled", region=region)
    return PriceSource(ctl.core, opsettings.price_table, live)


@kopf.index("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT})
def pods_by_run(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_RUN]): dict(body)}


@kopf.index("", "v1", "nodes")
def nodes_by_name(*, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {name: dict(body)}


def _nodes_of(pods: list[dict[str, Any]], index: kopf.Index[Any, Any]) -> dict[str, dict[str, Any]]:
    """The cached Node objects the pods are placed on (not every node of the cluster)."""
    nodes: dict[str, dict[str, Any]] = {}
    for pod in pods:
        name = (pod.get("spec") or {}).get("nodeName")
        if name and name not in nodes and name in index:
            store = index[name]
            if store:
                nodes[name] = dict(next(iter(store)))
    return nodes


def _wake(namespace: str, name: str) -> None:
    event = _WAKERS.get((namespace, name))
    if event is not None:
        event.set()


@kopf.on.event("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT})
async def pod_changed(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any, **_: Any
) -> None:
    run = labels[LABEL_RUN]
    if namespace is None:
        return
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp") and POD_FINALIZER in (meta.get("finalizers") or []):
        # A pod on its way out: its run's loop records its cost and releases it — unless the
        # run is gone or going, in which case there is nothing left to bill.
        ctl = _controller(memo)
        if not await asyncio.to_thread(ctl.run_exists, namespace, run):
            await asyncio.to_thread(ctl.release_orphan, dict(body))
            return
    _wake(namespace, run)


@kopf.on.event("", "v1", "nodes")
async def node_changed(*, name: str, type: str, body: kopf.Body, **kwargs: Any) -> None:
    """A node deleted or tainted for termination concerns the runs with pods on it."""
    if type != "DELETED" and NodeView.of(dict(body)).termination_taint is None:
        return  # heartbeats and label churn: nothing for us
    index: kopf.Index[Any, Any] = kwargs["pods_by_run"]
    for key, store in index.items():
        if any((p.get("spec") or {}).get("nodeName") == name for p in store):
            _wake(*key)


@kopf.on.event("", "v1", "namespaces")
async def namespace_changed(*, name: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    """A namespace with runs is being deleted: let its runs and pods go (not interruptions)."""
    if not (body.get("metadata") or {}).get("deletionTimestamp"):
        return
    keys = [k for k in _WAKERS if k[0] == name]
    if not keys:
        return
    try:
        await asyncio.to_thread(_controller(memo).let_namespace_go, name, OPERATOR_FINALIZER)
    except ApiException as exc:
        log.warning("namespace release failed", namespace=name, status=exc.status, message=api_message(exc))
    for key in keys:
        _wake(*key)


@kopf.index(*RESOURCE)
def runs_by_namespace(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {namespace: dict(body)}


@kopf.index(*BUDGETS)
def budgets_by_namespace(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {namespace: dict(body)}


def _team(namespace: str, kwargs: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The namespace's TrainingBudgets and TrainingRuns, from the watch caches."""
    budgets: kopf.Index[Any, Any] = kwargs["budgets_by_namespace"]
    runs: kopf.Index[Any, Any] = kwargs["runs_by_namespace"]
    found = [dict(b) for b in budgets.get(namespace, [])]
    if not found:
        return [], []  # the common case: no budget, nothing to copy
    return found, [dict(r) for r in runs.get(namespace, [])]


async def budget_loop(namespace: str, memo: Any, kwargs: Mapping[str, Any]) -> None:
    """Keeps the namespace's TrainingBudgets' status current: on a change of a budget or a run,
    and when a clock is due (a threshold crossed at the current burn rate, the period's end)."""
    wake = _BUDGET_WAKERS.setdefault(namespace, asyncio.Event())
    ctl: BudgetController = memo["budgets"]
    resync = _controller(memo).settings.resync_seconds
    try:
        while True:
            wake.clear()
            budgets, runs = _team(namespace, kwargs)
            if not budgets:
                await asyncio.to_thread(ctl.refresh, namespace, [], [])  # forget their metrics
                return
            try:
                delay = await asyncio.to_thread(ctl.refresh, namespace, budgets, runs)
            except Exception:
                delay = 10.0
                log.exception("budget refresh failed", namespace=namespace, retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(0.5, min(delay, resync)))
            await asyncio.sleep(0.2)  # let bursts of events settle into one refresh
    finally:
        _BUDGET_LOOPS.pop(namespace, None)
        _BUDGET_WAKERS.pop(namespace, None)


def _wake_budgets(namespace: str) -> None:
    event = _BUDGET_WAKERS.get(namespace)
    if event is not None:
        event.set()


@kopf.on.event(*BUDGETS)
async def budget_changed(
    *, namespace: str | None, type: str | None, body: kopf.Body, memo: Any, **kwargs: Any
) -> None:
    """A TrainingBudget changed: refresh its status; unless this is the echo of our own status
    write, wake the namespace's runs (a run refused for lack of budget may start now)."""
    if namespace is None:
        return
    if namespace not in _BUDGET_LOOPS:
        _BUDGET_LOOPS[namespace] = asyncio.create_task(budget_loop(namespace, memo, kwargs))
    _wake_budgets(namespace)
    if type == "DELETED" or not memo["budgets"].is_own_write(dict(body)):
        for key in [k for k in _WAKERS if k[0] == namespace]:
            _wake(*key)


@kopf.on.cleanup()
async def stop_budget_loops(**_: Any) -> None:
    for task in list(_BUDGET_LOOPS.values()):
        task.cancel()


@kopf.on.event(*RESOURCE)
async def run_changed(*, namespace: str | None, name: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    if namespace is None:
        return
    _wake_budgets(namespace)
    if _controller(memo).is_own_write(dict(body)):
        return  # the echo of our own status write: nothing new to act on
    _wake(namespace, name)


@kopf.daemon(*RESOURCE, cancellation_timeout=30.0, initial_delay=0)
async def run_loop(
    *,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: Any,
    stopped: kopf.DaemonStopped,
    **kwargs: Any,
) -> None:
    if namespace is None:
        return
    pods_by_run: kopf.Index[Any, Any] = kwargs["pods_by_run"]
    nodes_by_name: kopf.Index[Any, Any] = kwargs["nodes_by_name"]
    ctl = _controller(memo)
    gate: ReconcileGate = memo["gate"]
    key = (namespace, name)
    wake = asyncio.Event()
    _WAKERS[key] = wake
    try:
        failures = 0
        while not stopped:
            wake.clear()
            live = any(
                not (p.get("metadata") or {}).get("deletionTimestamp") for p in pods_by_run.get(key, [])
            )
            await gate.acquire(ReconcileGate.NORMAL if live else ReconcileGate.URGENT)
            try:
                pods = [dict(p) for p in pods_by_run.get(key, [])]
                nodes = _nodes_of(pods, nodes_by_name)
                team = _team(namespace, kwargs)
                delay = await asyncio.to_thread(ctl.reconcile, dict(body), pods, nodes, team)
                failures = 0
            except ApiException as exc:
                failures += 1
                delay = min(60.0, 2.0**failures)
                log.warning(
                    "reconcile failed",
                    namespace=namespace,
                    run=name,
                    status=exc.status,
                    reason=exc.reason,
                    message=api_message(exc),
                    retry_in=delay,
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                # The API server is unreachable (restarting, network): one line, then retry.
                failures += 1
                delay = min(60.0, 2.0**failures)
                log.warning(
                    "api server unreachable",
                    namespace=namespace,
                    run=name,
                    error=str(exc)[:200],
                    retry_in=delay,
                )
            except Exception:
                failures += 1
                delay = min(300.0, 2.0**failures)
                log.exception("reconcile crashed", namespace=namespace, run=name, retry_in=delay)
            finally:
                gate.release()
            # None: nothing is due (a terminal run, an invalid spec): wait for a change, no polling.
            wait = None if delay is None else max(0.05, min(delay, ctl.settings.resync_seconds))
            waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())}
            try:
                done, _pending = await asyncio.wait(
                    waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for w in waiters:
                    w.cancel()
            if done and not stopped:
                await asyncio.sleep(0.05)  # let bursts of events settle into one reconcile
    finally:
        if _WAKERS.get(key) is wake:
            del _WAKERS[key]
        if body.get("metadata", {}).get("deletionTimestamp"):
            ctl.forget(namespace, name)
            metrics.forget_run(namespace, name)
