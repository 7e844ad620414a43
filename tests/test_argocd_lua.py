"""Argo CD health check and actions for TrainingRuns, run in real Lua interpreters (lupa).

Argo CD runs these scripts in gopher-lua (Lua 5.1) with the resource as the global ``obj`` and
action parameters as ``actionParams``; they are run here in Lua 5.1 and 5.4 alike. The samples'
status is built with the operator's own API models, so the field names the Lua reads are the
ones the operator writes.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fermata_api import (
    Condition,
    CostStatus,
    Decision,
    Phase,
    TrainingRunStatus,
)

pytest.importorskip("lupa", reason="lupa (Lua for Python) is a dev dependency")

ARGOCD = Path(__file__).resolve().parents[1] / "charts" / "fermata" / "argocd"
HEALTH = (ARGOCD / "health.lua").read_text()
DISCOVERY = (ARGOCD / "actions" / "discovery.lua").read_text()
ACTIONS = {
    name: (ARGOCD / "actions" / name / "action.lua").read_text()
    for name in ("suspend", "resume", "raise-budget")
}
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["lua51", "lua54"])
def lua(request: pytest.FixtureRequest) -> Any:
    module = pytest.importorskip(f"lupa.{request.param}")
    return module.LuaRuntime(unpack_returned_tuples=True)


def to_lua(rt: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return rt.table_from({k: to_lua(rt, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return rt.table_from([to_lua(rt, v) for v in value])
    return value


def from_lua(value: Any) -> Any:
    if hasattr(value, "items") and callable(value.items):
        items = dict(value.items())
        if items and all(isinstance(k, int) for k in items) and set(items) == set(range(1, len(items) + 1)):
            return [from_lua(items[i]) for i in range(1, len(items) + 1)]
        return {k: from_lua(v) for k, v in items.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def run_lua(rt: Any, script: str, obj: dict[str, Any], params: dict[str, str] | None = None) -> Any:
    g = rt.globals()
    g.obj = to_lua(rt, copy.deepcopy(obj))
    g.actionParams = to_lua(rt, params) if params is not None else None
    return from_lua(rt.execute(script))


def run(
    phase: Phase | None = None,
    *,
    generation: int = 1,
    observed: int | None = 1,
    suspend: bool = False,
    decision: Decision | None = None,
    decision_reason: str | None = None,
    message: str | None = None,
    conditions: list[Condition] | None = None,
) -> dict[str, Any]:
    """A TrainingRun as the API server returns it (status from the operator's models)."""
    obj: dict[str, Any] = {
        "apiVersion": "fermata.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "amapiano", "namespace": "ml", "generation": generation},
        "spec": {"suspend": suspend, "budget": {"maxUSD": 600.0, "warnAtFraction": 0.8}},
    }
    if phase is not None:
        status = TrainingRunStatus(
            phase=phase,
            decision=decision,
            decision_reason=decision_reason,
            message=message,
            observed_generation=observed,
            progress_percent=42.0,
            conditions=conditions or [],
            cost=CostStatus(accrued_usd=123.45, budget_usd=600.0, remaining_usd=476.55, updated=NOW),
        )
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


HEALTH_CASES = [
    ("no status", run(None), "Progressing", "Waiting for the Fermata operator"),
    ("spec not yet observed", run(Phase.running, generation=3, observed=2), "Progressing", "generation 3"),
    ("never observed", run(Phase.pending, generation=1, observed=None), "Progressing", "observed ?"),
    (
        "pending",
        run(Phase.pending, message="waiting for a spot g4dn.xlarge node"),
        "Progressing",
        "Pending: waiting for a spot g4dn.xlarge node",
    ),
    (
        "running",
        run(Phase.running, decision=Decision.go),
        "Healthy",
        "Running (42.0% done, $123.45 of $600.00",
    ),
    (
        "running after conditional go",
        run(Phase.running, decision=Decision.conditional_go),
        "Healthy",
        "decision CONDITIONAL-GO",
    ),
    (
        "running after a NO-GO with onNoGo=continue",
        run(Phase.running, decision=Decision.no_go, decision_reason="week-5: authenticity 0.21 < 0.35"),
        "Degraded",
        "authenticity 0.21 < 0.35",
    ),
    ("suspend requested, still running", run(Phase.running, suspend=True), "Progressing", "Suspending"),
    ("suspended", run(Phase.suspended, suspend=True), "Suspended", "spec.suspend=false"),
    ("resume requested", run(Phase.suspended, suspend=False), "Progressing", "Resuming"),
    ("succeeded with GO", run(Phase.succeeded, decision=Decision.go), "Healthy", "Succeeded"),
    (
        "succeeded with NO-GO",
        run(Phase.succeeded, decision=Decision.no_go, decision_reason="final gate: loss 3.9 > 3.5"),
        "Degraded",
        "loss 3.9 > 3.5",
    ),
    (
        "failed",
        run(Phase.failed, message="trainer exited 137 (OOMKilled)"),
        "Degraded",
        "Failed: trainer exited 137",
    ),
    ("budget exceeded", run(Phase.budget_exceeded, message="spent $600.10"), "Degraded", "BudgetExceeded"),
    ("idle stopped", run(Phase.idle_stopped, message="no step for 2h"), "Degraded", "IdleStopped"),
    ("stopped by a gate", run(Phase.stopped, decision=Decision.no_go), "Degraded", "Stopped"),
    (
        "spec not accepted",
        run(
            Phase.pending,
            conditions=[
                Condition(
                    type="Accepted",
                    status="False",
                    reason="InvalidSpec",
                    message="no price for p9.xlarge/spot",
                    last_transition_time=NOW,
                )
            ],
        ),
        "Degraded",
        "no price for p9.xlarge/spot",
    ),
]


@pytest.mark.parametrize(("case", "obj", "status", "message"), HEALTH_CASES, ids=[c[0] for c in HEALTH_CASES])
def test_health(lua: Any, case: str, obj: dict[str, Any], status: str, message: str) -> None:
    hs = run_lua(lua, HEALTH, obj)
    assert hs["status"] == status, (case, hs)
    assert message in hs["message"], (case, hs)


def test_health_of_an_unknown_phase(lua: Any) -> None:
    obj = run(Phase.running)
    obj["status"]["phase"] = "Exploded"
    assert run_lua(lua, HEALTH, obj) == {"status": "Unknown", "message": "Unknown phase Exploded"}


@pytest.mark.parametrize(
    ("phase", "suspend", "enabled"),
    [
        (Phase.running, False, {"suspend", "raise-budget"}),
        (Phase.pending, False, {"suspend", "raise-budget"}),
        (None, False, {"suspend", "raise-budget"}),
        (Phase.suspended, True, {"resume", "raise-budget"}),
        (Phase.succeeded, False, set()),
        (Phase.budget_exceeded, False, set()),
        (Phase.stopped, True, set()),
    ],
)
def test_discovery(lua: Any, phase: Phase | None, suspend: bool, enabled: set[str]) -> None:
    actions = run_lua(lua, DISCOVERY, run(phase, suspend=suspend))
    assert set(actions) == {"suspend", "resume", "raise-budget"}
    assert {name for name, a in actions.items() if not a["disabled"]} == enabled
    assert actions["raise-budget"]["params"] == [{"name": "amountUSD", "default": "100"}]


def test_suspend_and_resume(lua: Any) -> None:
    obj = run(Phase.running)
    suspended = run_lua(lua, ACTIONS["suspend"], obj)
    assert suspended["spec"]["suspend"] is True
    assert suspended["metadata"] == obj["metadata"]
    assert suspended["status"]["phase"] == "Running" and suspended["spec"]["budget"] == obj["spec"]["budget"]
    resumed = run_lua(lua, ACTIONS["resume"], suspended)
    assert resumed["spec"]["suspend"] is False


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, 700),  # Argo CD without action parameters: the fixed step
        ({}, 700),
        ({"amountUSD": ""}, 700),
        ({"amountUSD": "250.5"}, 850.5),
        ({"amountUSD": "0.004"}, 600),  # cents
    ],
)
def test_raise_budget(lua: Any, params: dict[str, str] | None, expected: float) -> None:
    out = run_lua(lua, ACTIONS["raise-budget"], run(Phase.running), params)
    assert out["spec"]["budget"]["maxUSD"] == pytest.approx(expected)
    assert out["spec"]["budget"]["warnAtFraction"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"amountUSD": "-5"}, "amountUSD must be a positive number"),
        ({"amountUSD": "lots"}, "amountUSD must be a positive number"),
        ({"amountUSD": "1e8"}, "cannot exceed 10000000"),
    ],
)
def test_raise_budget_rejects_bad_amounts(lua: Any, params: dict[str, str], error: str) -> None:
    with pytest.raises(Exception, match=error) as err:  # each Lua version has its own LuaError
        run_lua(lua, ACTIONS["raise-budget"], run(Phase.running), params)
    assert type(err.value).__name__ == "LuaError"


def test_argocd_cm_snippet_carries_the_same_lua() -> None:
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    data = cm["data"]
    assert data["resource.customizations.health.fermata.dev_TrainingRun"] == HEALTH
    actions = yaml.safe_load(data["resource.customizations.actions.fermata.dev_TrainingRun"])
    assert actions["discovery.lua"] == DISCOVERY
    assert {d["name"]: d["action.lua"] for d in actions["definitions"]} == ACTIONS
