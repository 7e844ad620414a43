"""The planner with team budgets resolved before planning: refuse a first pod the budget cannot
afford, warn, and stop a running run at the cap the way the per-run budget does."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fermata_operator.planner import Observed, Plan, plan
from fermata_operator.policies import team_budget as tb
from fermata_operator.policies.prices import PriceTable
from fermata_operator.policies.team_budget import BudgetFacts
from fermata_operator.settings import OperatorSettings
from tests.operator.factories import T0, node, pod_for, progress, run, running

NODES = {"spot-1": node("spot-1")}


def facts(spent: float, cap: float = 10.0, rate: float = 0.0) -> BudgetFacts:
    return BudgetFacts("team", cap, spent, rate, T0 - timedelta(days=4), T0 + timedelta(days=27), 0.8)


def step(r: dict[str, Any], pods: list[dict[str, Any]], at: timedelta, budgets: list[BudgetFacts]) -> Plan:
    obs = Observed(
        run=r,
        pods=pods,
        nodes=NODES,
        missing_nodes=set(),
        prices=PriceTable(),
        now=T0 + at,
        team_budgets=budgets,
    )
    result = plan(obs, OperatorSettings())
    trainer = {k: v for k, v in (r.get("status") or {}).items() if k in {"progress", "lastCheckpoint"}}
    r["status"] = {**result.status, **trainer}
    return result


def cond(r: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in r["status"]["conditions"] if c["type"] == ctype)


def test_a_run_the_budget_cannot_afford_gets_no_pod_until_it_can() -> None:
    r = run()
    p = step(r, [], timedelta(0), [facts(spent=9.8)])  # $0.20 left, g4dn.xlarge spot $0.39/h
    assert p.create == []
    assert r["status"]["phase"] == "Pending"
    assert cond(r, "TeamBudget")["status"] == "False"
    assert cond(r, "TeamBudget")["reason"] == tb.INSUFFICIENT
    assert [e.reason for e in p.events] == [tb.INSUFFICIENT]
    assert p.requeue_after is not None and p.requeue_after > 0
    again = step(r, [], timedelta(seconds=5), [facts(spent=9.8)])
    assert again.events == []  # said once
    raised = step(r, [], timedelta(seconds=10), [facts(spent=9.8, cap=100.0)])
    assert [o["kind"] for o in raised.create][-1] == "Pod"
    assert cond(r, "TeamBudget")["status"] == "True"


def test_a_running_run_is_warned_then_stopped_with_a_checkpoint_at_the_cap() -> None:
    r = run()
    step(r, [], timedelta(0), [facts(spent=0.0)])
    pod = running(pod_for(r), "spot-1", T0)
    r["status"]["progress"] = progress(10, 100, T0 + timedelta(minutes=10), pod="demo-0")
    warned = step(r, [pod], timedelta(minutes=10), [facts(spent=8.5, rate=0.39)])
    assert cond(r, "TeamBudget")["reason"] == tb.WARNING
    assert tb.WARNING in [e.reason for e in warned.events]
    stopped = step(r, [pod], timedelta(minutes=11), [facts(spent=10.0, rate=0.39)])
    assert r["status"]["phase"] == "BudgetExceeded"
    assert r["status"]["stop"]["reason"] == tb.EXCEEDED
    # The live trainer is asked to checkpoint and exit first (the per-run budget's stop).
    request = r["status"]["control"]["checkpointRequest"]
    assert request["stop"] is True and request["reason"] == tb.EXCEEDED
    assert stopped.stop_pods == []


def test_no_team_budget_changes_nothing() -> None:
    r = run()
    p = step(r, [], timedelta(0), [])
    assert [o["kind"] for o in p.create][-1] == "Pod"
    assert all(c["type"] != "TeamBudget" for c in r["status"]["conditions"])
