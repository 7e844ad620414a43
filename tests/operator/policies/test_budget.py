"""The dollar budget: warn once, stop at the budget, stop on a projected overrun only when asked."""

from __future__ import annotations

import pytest

from fermata_api import BudgetSpec, CostStatus, Decision, Phase
from fermata_api import conditions as cond
from fermata_operator.policies import budget
from fermata_operator.policies.effects import Event, SetCondition, Stop


def status(accrued: float, rate: float = 0.0, projected: float | None = None) -> CostStatus:
    return CostStatus(
        accrued_usd=accrued, hourly_rate_usd=rate, projected_total_usd=projected, budget_usd=100.0
    )


def spec(**kw: object) -> BudgetSpec:
    return BudgetSpec(max_usd=100.0, warn_at_fraction=0.8, **kw)  # type: ignore[arg-type]


def by_type(conditions: list[SetCondition]) -> dict[str, SetCondition]:
    return {c.type: c for c in conditions}


def test_within_budget() -> None:
    v = budget.evaluate(status(10.0), spec(), warned=False)
    c = by_type(v.conditions)
    assert c[cond.BUDGET_WARNING].status is False and c[cond.BUDGET_WARNING].reason == "WithinBudget"
    assert c[cond.BUDGET_EXCEEDED].status is False and c[cond.BUDGET_EXCEEDED].reason == "WithinBudget"
    assert c[cond.BUDGET_WARNING].message == "spent $10.00 of $100.00"
    assert v.events == [] and v.stop is None
    assert v.wake_in is None  # nothing burns: no clock


def test_warning_at_the_fraction_event_only_the_first_time() -> None:
    first = budget.evaluate(status(80.0), spec(), warned=False)
    c = by_type(first.conditions)
    assert c[cond.BUDGET_WARNING] == SetCondition(
        cond.BUDGET_WARNING, True, "BudgetWarning", "spent $80.00, 80% of the $100.00 budget"
    )
    assert c[cond.BUDGET_EXCEEDED].status is False
    assert first.events == [Event("Warning", "BudgetWarning", "spent $80.00, 80% of the $100.00 budget")]
    assert first.stop is None
    again = budget.evaluate(status(85.0), spec(), warned=True)
    assert by_type(again.conditions)[cond.BUDGET_WARNING].status is True
    assert again.events == []


def test_just_under_the_fraction_does_not_warn() -> None:
    v = budget.evaluate(status(79.99), spec(), warned=False)
    assert by_type(v.conditions)[cond.BUDGET_WARNING].status is False
    assert v.events == []


@pytest.mark.parametrize("accrued", [100.0, 100.01, 250.0])
def test_exceeded_stops_with_no_go(accrued: float) -> None:
    v = budget.evaluate(status(accrued, rate=5.0), spec(), warned=True)
    msg = f"spent ${accrued:.2f} of the $100.00 budget"
    assert v.stop == Stop(Phase.budget_exceeded, "BudgetExceeded", msg, Decision.no_go)
    assert v.conditions == [SetCondition(cond.BUDGET_EXCEEDED, True, "BudgetExceeded", msg)]
    assert v.wake_in is None


def test_projected_overrun_stops_only_when_enabled() -> None:
    s = status(50.0, rate=2.0, projected=120.0)
    off = budget.evaluate(s, spec(), warned=False)
    assert off.stop is None
    assert by_type(off.conditions)[cond.BUDGET_EXCEEDED].status is False
    on = budget.evaluate(s, spec(stop_on_projected_overrun=True), warned=False)
    assert on.stop is not None
    assert on.stop.phase is Phase.budget_exceeded
    assert on.stop.reason == "ProjectedOverrun"
    assert on.stop.decision is Decision.no_go
    assert on.stop.message == "projected total $120.00 exceeds the $100.00 budget (spent $50.00 so far)"
    c = by_type(on.conditions)[cond.BUDGET_EXCEEDED]
    assert c.status is True and c.reason == "ProjectedOverrun"


def test_projection_at_the_budget_or_unknown_does_not_stop() -> None:
    enabled = spec(stop_on_projected_overrun=True)
    assert budget.evaluate(status(50.0, 2.0, projected=100.0), enabled, warned=False).stop is None
    assert budget.evaluate(status(50.0, 2.0, projected=None), enabled, warned=False).stop is None


def test_real_overrun_wins_over_projection() -> None:
    v = budget.evaluate(status(100.0, 2.0, projected=300.0), spec(stop_on_projected_overrun=True), False)
    assert v.stop is not None and v.stop.reason == "BudgetExceeded"


@pytest.mark.parametrize(
    ("accrued", "rate", "wake"),
    [
        (40.0, 6.0, 36000.0),  # $60 left at $6/h: 10h
        (99.0, 3.6, 1000.0),  # $1 left at $3.6/h
        (99.9999, 3.6, 1.0),  # floored at one second
    ],
)
def test_wakes_when_the_budget_is_reached_at_the_current_rate(
    accrued: float, rate: float, wake: float
) -> None:
    v = budget.evaluate(status(accrued, rate), spec(), warned=True)
    assert v.wake_in == pytest.approx(wake)


def test_overshoot_bound() -> None:
    # $3.60/h for 5 s latency + 60 s request timeout + 150 s grace = 215 s → $0.215
    assert budget.overshoot_bound_usd(3.6, 60, 150) == pytest.approx(0.215)
    assert budget.overshoot_bound_usd(36.0, 120, 150, latency_s=30) == pytest.approx(3.0)
    assert budget.overshoot_bound_usd(0.0, 120, 150) == 0.0
