"""Team budgets (TrainingBudget) against the real API server: the warning, the stop of a running
run at the cap (checkpoint first), a run refused before its first pod, and its start once the
budget is raised. Prices are overridden per run to make money move in seconds (1 cent/s)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from fermata_api.meta import BUDGET_PLURAL
from fermata_dev.kubelet import LocalKubelet
from tests.e2e.conftest import GROUP, PLURAL, VERSION, OperatorProcess, Runs, spec, wait_for
from tests.e2e.test_policies import FAST_PRICES, report, running

pytestmark = pytest.mark.cluster


def create_run(runs: Runs, name: str, labels: dict[str, str]) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name, "labels": labels},
        "spec": spec(budget={"maxUSD": 100, "prices": FAST_PRICES}),
    }
    runs.custom.create_namespaced_custom_object(GROUP, VERSION, runs.ns, PLURAL, body)


def budget(runs: Runs, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = runs.custom.get_namespaced_custom_object(
        GROUP, VERSION, runs.ns, BUDGET_PLURAL, name
    )
    return obj


def budget_condition(runs: Runs, name: str, ctype: str) -> dict[str, Any] | None:
    conditions = (budget(runs, name).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == ctype), None)


def budget_events(runs: Runs, name: str) -> set[str]:
    items = runs.core.list_namespaced_event(
        runs.ns, field_selector=f"involvedObject.name={name},involvedObject.kind=TrainingBudget"
    ).items
    return {e.reason for e in items}


def test_team_budget_warns_stops_at_the_cap_and_refuses_a_run_it_cannot_afford(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    create_run(runs, "alpha", {"team": "audio"})
    create_run(runs, "other", {"team": "video"})  # not selected: never stopped by the budget
    running(runs, "alpha", "alpha-0")
    running(runs, "other", "other-0")
    report(runs, "alpha", 5, "alpha-0")
    # $36/h = 1 cent/s: the 40-cent cap is reached some 40 s after alpha started.
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingBudget",
        "metadata": {"name": "audio"},
        "spec": {"periodUSD": 0.40, "warnAtFraction": 0.5, "selector": {"matchLabels": {"team": "audio"}}},
    }
    runs.custom.create_namespaced_custom_object(GROUP, VERSION, runs.ns, BUDGET_PLURAL, body)
    wait_for(
        lambda: (c := budget_condition(runs, "audio", "Warning")) and c["status"] == "True",
        timeout=30,
        what="budget Warning",
    )
    st = wait_for(
        lambda: (s := runs.status("alpha")).get("phase") == "BudgetExceeded" and s,
        timeout=90,
        what="alpha stopped by the team budget",
    )
    assert st["stop"]["reason"] == "TeamBudgetExceeded"
    assert runs.condition("alpha", "TeamBudget")["reason"] == "TeamBudgetExceeded"  # type: ignore[index]
    wait_for(lambda: runs.pods("alpha") == [], timeout=30, what="alpha's pod stopped and released")
    wait_for(
        lambda: (c := budget_condition(runs, "audio", "Exhausted")) and c["status"] == "True",
        timeout=20,
        what="budget Exhausted",
    )
    wait_for(
        lambda: {"TeamBudgetWarning", "TeamBudgetExceeded"} <= budget_events(runs, "audio"),
        timeout=20,
        what="Events on the budget",
    )
    status = budget(runs, "audio")["status"]
    assert status["spentUSD"] >= 0.40 and status["remainingUSD"] == 0
    assert [r["name"] for r in status["runs"]] == ["alpha"]
    assert runs.status("other")["phase"] == "Running"

    # A new run of the team: refused before its first pod, Pending with TeamBudget=False.
    create_run(runs, "beta", {"team": "audio"})
    wait_for(
        lambda: (c := runs.condition("beta", "TeamBudget")) and c["status"] == "False",
        timeout=30,
        what="beta refused by the team budget",
    )
    assert runs.status("beta")["phase"] == "Pending"
    assert runs.pods("beta") == []
    assert "TeamBudgetInsufficient" in {e.reason for e in runs.events("beta")}

    # Raising the cap wakes the refused run: it gets its pod without waiting for the period's end.
    runs.custom.patch_namespaced_custom_object(
        GROUP, VERSION, runs.ns, BUDGET_PLURAL, "audio", {"spec": {"periodUSD": 1000}}
    )
    wait_for(lambda: runs.pods("beta") != [], timeout=30, what="beta's pod after the cap was raised")
    wait_for(
        lambda: (c := runs.condition("beta", "TeamBudget")) and c["status"] == "True",
        timeout=10,
        what="beta admitted by the team budget",
    )
    client.CustomObjectsApi(runs.api).delete_namespaced_custom_object(
        GROUP, VERSION, runs.ns, BUDGET_PLURAL, "audio"
    )
