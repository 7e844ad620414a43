"""Team budgets (``TrainingBudget``) against the API: their facts for the run planner, and their
status, Events and metrics (synchronous; called in a thread).

The decisions are :mod:`fermata_operator.policies.team_budget`'s. Here the watch caches (kopf
indices of the namespace's TrainingBudgets and TrainingRuns) are turned into
:class:`~fermata_operator.policies.team_budget.BudgetFacts`: for a run's reconcile (the budgets
that select it, like prices are resolved before planning) and for the budget's own status.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from threading import Lock
from typing import Any

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from fermata_api import CostStatus, contract, parse_time
from fermata_api.budget import TrainingBudgetSpec, TrainingBudgetStatus
from fermata_api.meta import BUDGET_KIND, BUDGET_PLURAL, OPERATOR_FIELD_MANAGER
from fermata_operator import metrics
from fermata_operator.policies import team_budget
from fermata_operator.policies.team_budget import BudgetFacts, RunFacts

log = structlog.get_logger("fermata.team_budgets")


def run_facts(run: dict[str, Any]) -> RunFacts:
    """A run's labels and billed spans; ``segments=None`` when its cost is there but unreadable."""
    meta = run.get("metadata") or {}
    raw = (run.get("status") or {}).get("cost")
    segments = []
    if raw is not None:
        try:
            segments = CostStatus.model_validate(raw).segments
        except ValidationError:
            return RunFacts(meta.get("name", ""), dict(meta.get("labels") or {}), None)
    return RunFacts(meta.get("name", ""), dict(meta.get("labels") or {}), segments)


def _status(budget: dict[str, Any]) -> TrainingBudgetStatus | None:
    try:
        return TrainingBudgetStatus.model_validate(budget.get("status") or {})
    except ValidationError:
        return None


def budget_facts(budget: dict[str, Any], runs: list[dict[str, Any]], now: datetime) -> BudgetFacts:
    """One budget's standing from the namespace's runs (an unreadable spec: spend unknown)."""
    name = (budget.get("metadata") or {}).get("name", "")
    try:
        spec = TrainingBudgetSpec.model_validate(budget.get("spec") or {})
    except ValidationError as exc:
        return team_budget.invalid(name, str(exc.errors()[0]["msg"]), now)
    return team_budget.summarize(name, spec, (run_facts(r) for r in runs), now, _status(budget))


def facts_for_run(
    run: dict[str, Any], budgets: list[dict[str, Any]], runs: list[dict[str, Any]], now: datetime
) -> list[BudgetFacts]:
    """The budgets that select ``run`` (an unreadable one selects every run), with ``run`` as
    planned (the freshest copy) in place of its cached one."""
    meta = run["metadata"]
    labels = dict(meta.get("labels") or {})
    others = [r for r in runs if (r.get("metadata") or {}).get("name") != meta["name"]]
    found = []
    for b in budgets:
        try:
            spec = TrainingBudgetSpec.model_validate(b.get("spec") or {})
        except ValidationError:
            found.append(budget_facts(b, [], now))
            continue
        if team_budget.selects(spec.selector, labels):
            found.append(budget_facts(b, [*others, run], now))
    return found


def _stable(status: dict[str, Any]) -> Any:
    """What must be written at once (anything but the running totals)."""
    conds = [(c.get("type"), c.get("status"), c.get("reason")) for c in status.get("conditions") or []]
    runs = sorted(r.get("name") for r in status.get("runs") or [])
    keys = ("observedGeneration", "periodStart", "periodEnd", "capUSD")
    return conds, runs, [status.get(k) for k in keys]


@dataclass
class BudgetController:
    api: client.ApiClient
    cost_write_seconds: float = 60.0
    #: resourceVersion of our last status write of each budget (its echo wakes no run).
    _written: dict[tuple[str, str], str] = field(default_factory=dict)
    _known: dict[str, set[str]] = field(default_factory=dict)
    _lock: Lock = field(default_factory=Lock)

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def is_own_write(self, budget: dict[str, Any]) -> bool:
        meta = budget.get("metadata") or {}
        with self._lock:
            mine = self._written.get((meta.get("namespace", ""), meta.get("name", "")))
        return mine is not None and mine == meta.get("resourceVersion")

    def refresh(self, ns: str, budgets: list[dict[str, Any]], runs: list[dict[str, Any]]) -> float:
        """Recompute and write each budget's status; returns seconds until one is due again."""
        now = datetime.now(UTC)
        delays = [3600.0]
        names = set()
        for budget in budgets:
            name = budget["metadata"]["name"]
            names.add(name)
            facts = budget_facts(budget, runs, now)
            status, events, wake = team_budget.budget_status(
                facts, _status(budget), budget["metadata"].get("generation"), now
            )
            delays.append(wake)
            self._write(budget, status.model_dump(mode="json", by_alias=True, exclude_none=True), now)
            for ev in events:
                self.post_event(budget, ev.type, ev.reason, ev.message)
            metrics.observe_budget(ns, name, facts.cap_usd, facts.spent_usd)
        for gone in self._known.get(ns, set()) - names:
            metrics.forget_budget(ns, gone)
        self._known[ns] = names
        return min(delays)

    def _write(self, budget: dict[str, Any], new: dict[str, Any], now: datetime) -> None:
        meta = budget["metadata"]
        old = budget.get("status") or {}
        if _stable(old) == _stable(new):
            updated = parse_time(old.get("updated"))
            age = None if updated is None else (now - updated).total_seconds()
            if age is not None and age < self.cost_write_seconds:
                return
        body = {"status": {**{k: None for k in old if k not in new}, **new}}
        try:
            written = self.custom.patch_namespaced_custom_object_status(
                contract.API_GROUP,
                contract.API_VERSION,
                meta["namespace"],
                BUDGET_PLURAL,
                meta["name"],
                body,
                field_manager=OPERATOR_FIELD_MANAGER,
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        with self._lock:
            self._written[(meta["namespace"], meta["name"])] = written["metadata"]["resourceVersion"]

    def post_event(self, budget: dict[str, Any], etype: str, reason: str, message: str) -> None:
        meta = budget["metadata"]
        now = datetime.now(UTC).isoformat()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
                "kind": BUDGET_KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": etype,
            "source": {"component": OPERATOR_FIELD_MANAGER},
            "reportingComponent": OPERATOR_FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as exc:  # events are best effort
            log.warning("event not posted", reason=reason, status=exc.status)
        metrics.DECISIONS.labels(namespace=meta["namespace"], reason=reason).inc()
        log.info(
            "event",
            namespace=meta["namespace"],
            budget=meta["name"],
            type=etype,
            reason=reason,
            message=message,
        )
