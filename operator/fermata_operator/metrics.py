"""Prometheus metrics the operator exports (served on ``FERMATA_METRICS_PORT``, default 8080).

Per-run gauges carry ``namespace`` and ``run`` labels; phase and decision are one-hot gauges
(``fermata_run_phase{phase="Running"} 1``) so alert rules can match them directly.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from fermata_api import Decision, Phase, parse_time

_RUN = ["namespace", "run"]

COST_USD = Gauge("fermata_run_cost_usd", "Accrued spend of a run in US dollars", _RUN)
HOURLY_RATE_USD = Gauge(
    "fermata_run_hourly_rate_usd", "Current burn rate of a run in US dollars per hour", _RUN
)
BUDGET_USD = Gauge("fermata_run_budget_usd", "Budget of a run in US dollars", _RUN)
PROJECTED_USD = Gauge("fermata_run_projected_cost_usd", "Projected total spend at the current rate", _RUN)
INTERRUPTIONS = Gauge("fermata_run_interruptions", "Spot interruptions a run has survived", _RUN)
FAILURES = Gauge("fermata_run_failures", "Application failures a run has retried", _RUN)
CHECKPOINT_AGE = Gauge(
    "fermata_run_checkpoint_age_seconds", "Seconds since the newest verified checkpoint", _RUN
)
HEARTBEAT_AGE = Gauge("fermata_run_heartbeat_age_seconds", "Seconds since the trainer last reported", _RUN)
PROGRESS = Gauge("fermata_run_progress_ratio", "Share of planned steps done (0-1)", _RUN)
PHASE = Gauge("fermata_run_phase", "1 for the run's current phase", [*_RUN, "phase"])
DECISION = Gauge("fermata_run_decision", "1 for the run's latest go/no-go decision", [*_RUN, "decision"])
RECONCILE_SECONDS = Histogram(
    "fermata_reconcile_duration_seconds",
    "Time spent in one reconcile of one run",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("fermata_reconcile_errors_total", "Reconciles that raised", ["namespace"])
TAMPERING = Counter(
    "fermata_status_tampering_total",
    "Operator-owned status rewritten by someone else (restored from the operator's own record)",
    ["namespace"],
)
DECISIONS = Counter(
    "fermata_decisions_total", "Decisions the operator took, by Event reason", ["namespace", "reason"]
)
_BUDGET = ["namespace", "budget"]
TEAM_BUDGET_SPENT_USD = Gauge(
    "fermata_team_budget_spent_usd",
    "Spend of a TrainingBudget's selected runs in its current period",
    _BUDGET,
)
TEAM_BUDGET_CAP_USD = Gauge(
    "fermata_team_budget_cap_usd", "A TrainingBudget's cap per period (periodUSD)", _BUDGET
)


def _age(value: Any, now: datetime) -> float | None:
    ts = parse_time(value)
    return None if ts is None else max(0.0, (now - ts).total_seconds())


def observe_run(run: dict[str, Any], status: dict[str, Any]) -> None:
    """Refresh a run's gauges from the status just computed (and the trainer's report)."""
    ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
    now = datetime.now(UTC)
    cost = status.get("cost") or {}
    COST_USD.labels(ns, name).set(cost.get("accruedUSD", 0.0))
    HOURLY_RATE_USD.labels(ns, name).set(cost.get("hourlyRateUSD", 0.0))
    BUDGET_USD.labels(ns, name).set(cost.get("budgetUSD", 0.0))
    if cost.get("projectedTotalUSD") is not None:
        PROJECTED_USD.labels(ns, name).set(cost["projectedTotalUSD"])
    INTERRUPTIONS.labels(ns, name).set(status.get("interruptions", 0))
    FAILURES.labels(ns, name).set(status.get("failures", 0))
    trainer = run.get("status") or {}
    ckpt_age = _age((trainer.get("lastCheckpoint") or {}).get("time"), now)
    if ckpt_age is not None:
        CHECKPOINT_AGE.labels(ns, name).set(ckpt_age)
    hb_age = _age((trainer.get("progress") or {}).get("heartbeatTime"), now)
    if hb_age is not None:
        HEARTBEAT_AGE.labels(ns, name).set(hb_age)
    if status.get("progressPercent") is not None:
        PROGRESS.labels(ns, name).set(status["progressPercent"] / 100.0)
    phase = status.get("phase")
    for p in Phase:
        PHASE.labels(ns, name, p.value).set(1.0 if p.value == phase else 0.0)
    decision = status.get("decision")
    for d in Decision:
        DECISION.labels(ns, name, d.value).set(1.0 if d.value == decision else 0.0)


def forget_run(namespace: str, name: str) -> None:
    """Drop a deleted run's series."""
    for gauge in (
        COST_USD,
        HOURLY_RATE_USD,
        BUDGET_USD,
        PROJECTED_USD,
        INTERRUPTIONS,
        FAILURES,
        CHECKPOINT_AGE,
        HEARTBEAT_AGE,
        PROGRESS,
    ):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    for p in Phase:
        with contextlib.suppress(KeyError):
            PHASE.remove(namespace, name, p.value)
    for d in Decision:
        with contextlib.suppress(KeyError):
            DECISION.remove(namespace, name, d.value)


def observe_budget(namespace: str, budget: str, cap_usd: float, spent_usd: float) -> None:
    """Refresh a TrainingBudget's gauges."""
    TEAM_BUDGET_SPENT_USD.labels(namespace, budget).set(spent_usd)
    TEAM_BUDGET_CAP_USD.labels(namespace, budget).set(cap_usd)


def forget_budget(namespace: str, budget: str) -> None:
    """Drop a deleted TrainingBudget's series."""
    for gauge in (TEAM_BUDGET_SPENT_USD, TEAM_BUDGET_CAP_USD):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, budget)
