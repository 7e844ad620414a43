"""Team budgets (TrainingBudget): periods, selectors, spend clipped to the period, admission of
a run's first pod, the warning, and the stop at the cap — pure, no cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fermata_api import CostSegment, Phase
from fermata_api import conditions as cond
from fermata_api.budget import BudgetPeriod, LabelSelector, RunSpend, TrainingBudgetSpec, TrainingBudgetStatus
from fermata_operator.policies import team_budget as tb
from fermata_operator.policies.team_budget import BudgetFacts, RunFacts

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)  # a Tuesday


def seg(start: datetime, end: datetime | None, hourly: float = 10.0) -> CostSegment:
    usd = 0.0 if end is None else (end - start).total_seconds() / 3600 * hourly
    return CostSegment(pod="p", start=start, end=end, hourly_usd=hourly, usd=usd)


def budget(cap: float = 100.0, **kw: object) -> TrainingBudgetSpec:
    return TrainingBudgetSpec.model_validate({"periodUSD": cap, **kw})


def facts(spent: float, cap: float = 100.0, rate: float = 0.0, unknown: str | None = None) -> BudgetFacts:
    start, end = tb.period_bounds(BudgetPeriod.monthly, NOW)
    return BudgetFacts("team", cap, spent, rate, start, end, 0.8, unknown=unknown)


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        (BudgetPeriod.monthly, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
        (BudgetPeriod.weekly, datetime(2026, 3, 9, tzinfo=UTC), datetime(2026, 3, 16, tzinfo=UTC)),
        (BudgetPeriod.daily, datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC)),
    ],
)
def test_periods_are_calendar_periods_in_utc(period: BudgetPeriod, start: datetime, end: datetime) -> None:
    assert tb.period_bounds(period, NOW) == (start, end)


def test_december_rolls_into_next_year_and_february_has_its_own_length() -> None:
    assert tb.period_bounds(BudgetPeriod.monthly, datetime(2026, 12, 31, 23, tzinfo=UTC))[1] == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    assert tb.period_bounds(BudgetPeriod.monthly, datetime(2028, 2, 10, tzinfo=UTC))[1] == datetime(
        2028, 3, 1, tzinfo=UTC
    )


def test_selector_semantics() -> None:
    sel = LabelSelector.model_validate(
        {
            "matchLabels": {"team": "audio"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["dev", "prod"]},
                {"key": "exempt", "operator": "DoesNotExist"},
            ],
        }
    )
    assert tb.selects(sel, {"team": "audio", "tier": "dev"})
    assert not tb.selects(sel, {"team": "audio", "tier": "qa"})
    assert not tb.selects(sel, {"team": "audio", "tier": "dev", "exempt": "yes"})
    assert not tb.selects(sel, {"tier": "dev"})
    assert tb.selects(LabelSelector(), {})  # empty: every run


def test_spend_is_clipped_to_the_period() -> None:
    start, end = tb.period_bounds(BudgetPeriod.monthly, NOW)
    spans = [
        seg(start - timedelta(hours=2), start + timedelta(hours=1)),  # 1 of its 3 h inside: $10
        seg(NOW - timedelta(hours=3), NOW - timedelta(hours=1)),  # all inside: $20
        seg(start - timedelta(hours=5), start - timedelta(hours=4)),  # last month: $0
        seg(NOW - timedelta(minutes=30), None),  # open, up to now: $5
    ]
    assert tb.spend_in(spans, start, end, NOW) == pytest.approx(35.0)


def test_summary_sums_selected_runs_and_remembers_deleted_ones() -> None:
    spec = budget(selector={"matchLabels": {"team": "audio"}})
    runs = [
        RunFacts("a", {"team": "audio"}, [seg(NOW - timedelta(hours=2), None)]),
        RunFacts("b", {"team": "video"}, [seg(NOW - timedelta(hours=2), None)]),
    ]
    start, _ = tb.period_bounds(BudgetPeriod.monthly, NOW)
    previous = TrainingBudgetStatus(period_start=start, runs=[RunSpend(name="gone", spent_usd=7.0)])
    f = tb.summarize("team", spec, runs, NOW, previous)
    assert f.spent_usd == pytest.approx(27.0)
    assert f.hourly_rate_usd == pytest.approx(10.0)
    assert [r.name for r in f.by_run] == ["a", "gone"]
    # A new period forgets last period's deleted runs.
    later = tb.summarize("team", spec, runs, NOW + timedelta(days=30), previous)
    assert [r.name for r in later.by_run] == ["a"]


def test_unreadable_cost_makes_spend_unknown_and_refuses_new_pods() -> None:
    f = tb.summarize("team", budget(), [RunFacts("x", {}, None)], NOW)
    assert f.unknown is not None and not f.exhausted
    v = tb.admit([f], 1.0, NOW)
    assert v.conditions[0].status is False and v.conditions[0].reason == tb.INSUFFICIENT


def test_admission_needs_the_first_hour() -> None:
    ok = tb.admit([facts(spent=50.0)], 10.0, NOW)
    assert ok.conditions[0].status is True and ok.stop is None
    short = tb.admit([facts(spent=95.0)], 10.0, NOW)
    assert short.conditions[0].status is False and "first hour" in short.conditions[0].message
    assert short.wake_in == pytest.approx((datetime(2026, 4, 1, tzinfo=UTC) - NOW).total_seconds())
    assert tb.admit([facts(spent=0.0)], None, NOW).conditions[0].status is False  # unknown price
    assert tb.admit([], None, NOW).conditions == []  # no budget: nothing to say


def test_guard_warns_once_then_stops_at_the_cap() -> None:
    v = tb.guard([facts(spent=85.0, rate=10.0)], None, NOW)
    assert v.conditions[0].reason == tb.WARNING and [e.reason for e in v.events] == [tb.WARNING]
    assert v.wake_in == pytest.approx(15.0 / 10.0 * 3600)  # the cap, at the burn rate
    again = tb.guard([facts(spent=86.0, rate=10.0)], tb.WARNING, NOW)
    assert again.events == []
    stop = tb.guard([facts(spent=100.0)], tb.WARNING, NOW)
    assert stop.stop is not None and stop.stop.phase is Phase.budget_exceeded
    assert stop.stop.reason == tb.EXCEEDED
    assert stop.conditions[0].type == cond.TEAM_BUDGET and stop.conditions[0].status is False


def test_budget_status_conditions_and_events() -> None:
    status, events, wake = tb.budget_status(facts(spent=85.0, rate=10.0), None, 1, NOW)
    by_type = {c.type: c for c in status.conditions}
    assert by_type[cond.BUDGET_AT_WARNING].status == "True"
    assert by_type[cond.BUDGET_EXHAUSTED].status == "False"
    assert [e.reason for e in events] == [tb.WARNING]
    assert status.remaining_usd == pytest.approx(15.0)
    assert wake == pytest.approx(1.5 * 3600)
    status2, events2, _ = tb.budget_status(facts(spent=100.0), status, 1, NOW)
    assert [e.reason for e in events2] == [tb.EXCEEDED]  # the warning is not posted twice
    assert {c.type: c.status for c in status2.conditions}[cond.BUDGET_EXHAUSTED] == "True"
    assert status2.remaining_usd == 0.0


def test_spec_rules() -> None:
    with pytest.raises(ValueError):
        budget(cap=0)
    with pytest.raises(ValueError):
        budget(warnAtFraction=1.5)
    assert budget().period is BudgetPeriod.monthly and budget().warn_at_fraction == 0.8
