"""Team budgets (``TrainingBudget``): a dollar cap per period over the runs a selector picks.

The spend of a budget in its period is the sum, over the selected runs, of their billed spans
(``status.cost.segments``) clipped to the period: a closed span counts pro rata for the part
inside the period, an open one (a pod still running) at its hourly price up to now. Periods are
calendar months, ISO weeks (from Monday) or days, in UTC.

What the budget does to a run (:func:`admit`, :func:`guard`):

* **Before its first pod** a run starts only if every budget that selects it can still cover
  its first hour at its hourly price; an unknown price or spend refuses it (fail safe), and it
  stays Pending with ``TeamBudget=False`` until the budget changes or the period rolls over.
* At ``warnAtFraction`` of the cap: ``TeamBudget`` says so, with one Event on each run.
* At the cap: the selected running runs are stopped the way the per-run budget stops them
  (checkpoint first), in phase ``BudgetExceeded`` with reason ``TeamBudgetExceeded``.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fermata_api import CostSegment, Phase
from fermata_api import conditions as cond
from fermata_api.budget import (
    BudgetPeriod,
    LabelSelector,
    RunSpend,
    SelectorOperator,
    TrainingBudgetSpec,
    TrainingBudgetStatus,
)
from fermata_operator.policies.effects import Event, Stop, Verdict

EXCEEDED = "TeamBudgetExceeded"
INSUFFICIENT = "TeamBudgetInsufficient"
WARNING = "TeamBudgetWarning"
WITHIN = "WithinTeamBudget"
UNKNOWN = "TeamBudgetUnknown"


@dataclass(frozen=True)
class RunFacts:
    """A run as a budget sees it: its labels and billed spans (None: its cost cannot be read)."""

    name: str
    labels: Mapping[str, str]
    segments: list[CostSegment] | None


@dataclass(frozen=True)
class BudgetFacts:
    """One budget's standing now, resolved before planning (like prices)."""

    name: str
    cap_usd: float
    spent_usd: float
    hourly_rate_usd: float
    period_start: datetime
    period_end: datetime
    warn_at_fraction: float
    #: Why its spend cannot be counted (a run's cost unreadable, an invalid budget): no new pods.
    unknown: str | None = None
    by_run: tuple[RunSpend, ...] = field(default_factory=tuple)

    @property
    def remaining_usd(self) -> float:
        return max(0.0, self.cap_usd - self.spent_usd)

    @property
    def exhausted(self) -> bool:
        return self.unknown is None and self.spent_usd >= self.cap_usd

    @property
    def warning(self) -> bool:
        return self.unknown is None and self.spent_usd >= self.warn_at_fraction * self.cap_usd

    def seconds_to(self, usd: float) -> float | None:
        """Seconds until the spend reaches ``usd`` at the current burn rate (None: never)."""
        if self.spent_usd >= usd or self.hourly_rate_usd <= 0:
            return None
        return (usd - self.spent_usd) / self.hourly_rate_usd * 3600.0


# ----------------------------------------------------------------------------- periods and selectors


def period_bounds(period: BudgetPeriod, now: datetime) -> tuple[datetime, datetime]:
    """The period containing ``now``, as [start, end) in UTC."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period is BudgetPeriod.daily:
        return day, day + timedelta(days=1)
    if period is BudgetPeriod.weekly:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    return start, start + timedelta(days=calendar.monthrange(start.year, start.month)[1])


def selects(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics (an empty selector selects everything)."""
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for req in selector.match_expressions:
        present, value = req.key in labels, labels.get(req.key)
        ok = {
            SelectorOperator.in_: present and value in req.values,
            SelectorOperator.not_in: not present or value not in req.values,
            SelectorOperator.exists: present,
            SelectorOperator.does_not_exist: not present,
        }[req.operator]
        if not ok:
            return False
    return True


# ----------------------------------------------------------------------------- spend


def spend_in(segments: Iterable[CostSegment], start: datetime, end: datetime, now: datetime) -> float:
    """Cost of the spans within [start, end): closed spans pro rata, open ones up to ``now``."""
    total = 0.0
    for s in segments:
        seg_end = s.end or now
        lo, hi = max(s.start, start), min(seg_end, end)
        overlap = (hi - lo).total_seconds()
        if overlap <= 0:
            continue
        length = (seg_end - s.start).total_seconds()
        if s.end is not None and length > 0:
            total += s.usd * min(1.0, overlap / length)
        else:
            total += s.hourly_usd * overlap / 3600.0
    return total


def _gone(previous: TrainingBudgetStatus | None, present: set[str], start: datetime) -> list[RunSpend]:
    """Spend recorded this period for runs that no longer exist: deleting a run does not
    give its money back."""
    if previous is None or previous.period_start != start:
        return []
    return [RunSpend(name=r.name, spent_usd=r.spent_usd) for r in previous.runs if r.name not in present]


def summarize(
    name: str,
    spec: TrainingBudgetSpec,
    runs: Iterable[RunFacts],
    now: datetime,
    previous: TrainingBudgetStatus | None = None,
) -> BudgetFacts:
    """The budget's period, spend (in total and by run), burn rate and whether it is known
    (``previous``: the budget's status so far, for the spend of runs deleted since)."""
    start, end = period_bounds(spec.period, now)
    runs = list(runs)
    by_run = _gone(previous, {r.name for r in runs}, start)
    spent, rate, unreadable = sum(r.spent_usd for r in by_run), 0.0, []
    for run in sorted(runs, key=lambda r: r.name):
        if not selects(spec.selector, run.labels):
            continue
        if run.segments is None:
            unreadable.append(run.name)
            continue
        usd = spend_in(run.segments, start, end, now)
        run_rate = sum(s.hourly_usd for s in run.segments if s.end is None)
        spent, rate = spent + usd, rate + run_rate
        if usd > 0 or run_rate > 0:
            by_run.append(
                RunSpend(name=run.name, spent_usd=round(usd, 4), hourly_rate_usd=round(run_rate, 4))
            )
    unknown = f"the cost of {', '.join(unreadable)} cannot be read" if unreadable else None
    return BudgetFacts(
        name=name,
        cap_usd=spec.period_usd,
        spent_usd=round(spent, 6),
        hourly_rate_usd=round(rate, 6),
        period_start=start,
        period_end=end,
        warn_at_fraction=spec.warn_at_fraction,
        unknown=unknown,
        by_run=tuple(sorted(by_run, key=lambda r: r.name)),
    )


def invalid(name: str, problem: str, now: datetime) -> BudgetFacts:
    """A budget whose spec cannot be read: its spend is unknown, so it lets nothing start."""
    start, end = period_bounds(BudgetPeriod.daily, now)
    return BudgetFacts(name, 0.0, 0.0, 0.0, start, end, 1.0, unknown=f"invalid spec: {problem}")


def _next_wake(b: BudgetFacts, now: datetime) -> float:
    """Seconds until the budget's standing changes by the clock alone: the warning or the cap
    is crossed at the current burn rate, or the period rolls over."""
    clocks = [max(1.0, (b.period_end - now).total_seconds())]
    for usd in (b.warn_at_fraction * b.cap_usd, b.cap_usd):
        s = b.seconds_to(usd)
        if s is not None:
            clocks.append(max(1.0, s))
    return min(clocks)


# ----------------------------------------------------------------------------- the budget's own status


def budget_status(
    facts: BudgetFacts, previous: TrainingBudgetStatus | None, generation: int | None, now: datetime
) -> tuple[TrainingBudgetStatus, list[Event], float]:
    """The TrainingBudget's status, the Events to post on it, and when to look again."""
    conditions = list(previous.conditions) if previous else []
    events: list[Event] = []
    usd = f"${facts.spent_usd:.2f} of ${facts.cap_usd:.2f}"
    period = f"{facts.period_start:%Y-%m-%d} to {facts.period_end:%Y-%m-%d}"
    states = (
        (cond.BUDGET_AT_WARNING, facts.warning, WARNING, f"spent {usd} ({period}): warnAtFraction reached"),
        (cond.BUDGET_EXHAUSTED, facts.exhausted, EXCEEDED, f"spent {usd} ({period}): selected runs stop"),
    )
    for ctype, on, reason, message in states:
        if facts.unknown is not None:
            conditions = cond.put(conditions, ctype, "Unknown", UNKNOWN, facts.unknown, now, generation)
            continue
        if on and not cond.is_true(conditions, ctype):
            events.append(Event("Warning", reason, message))
        text = message if on else f"spent {usd} ({period})"
        conditions = cond.put(conditions, ctype, on, reason if on else WITHIN, text, now, generation)
    status = TrainingBudgetStatus(
        observed_generation=generation,
        period_start=facts.period_start,
        period_end=facts.period_end,
        cap_usd=facts.cap_usd,
        spent_usd=round(facts.spent_usd, 4),
        remaining_usd=round(facts.remaining_usd, 4),
        hourly_rate_usd=round(facts.hourly_rate_usd, 4),
        runs=list(facts.by_run),
        conditions=conditions,
        message=facts.unknown or f"spent {usd} this period ({period})",
        updated=now,
    )
    return status, events, _next_wake(facts, now)


# ----------------------------------------------------------------------------- what it does to a run


def admit(budgets: Iterable[BudgetFacts], hourly_usd: float | None, now: datetime) -> Verdict:
    """May a run that never started get its first pod? Every budget selecting it must cover its
    first hour at ``hourly_usd`` (None: unknown, refused). ``stop`` stays None: a refusal only
    sets ``TeamBudget=False`` and a wake-up (the period's end); a budget change wakes it too."""
    v = Verdict()
    budgets = list(budgets)
    for b in budgets:
        problem = None
        if b.unknown is not None:
            problem = f"team budget {b.name}: {b.unknown}: no pod while the team's spend is unknown"
        elif hourly_usd is None:
            problem = f"team budget {b.name}: the run's hourly price is unknown"
        elif b.remaining_usd < hourly_usd:
            problem = (
                f"team budget {b.name} has ${b.remaining_usd:.2f} left of ${b.cap_usd:.2f} until "
                f"{b.period_end:%Y-%m-%dT%H:%MZ}: not enough for the run's first hour (${hourly_usd:.2f})"
            )
        if problem is not None:
            v.condition(cond.TEAM_BUDGET, False, INSUFFICIENT, problem)
            v.wake(max(1.0, (b.period_end - now).total_seconds()))
            return v
    if budgets:
        names = ", ".join(f"{b.name} (${b.remaining_usd:.2f} left)" for b in budgets)
        v.condition(cond.TEAM_BUDGET, True, WITHIN, f"team budget {names}")
    return v


def guard(budgets: Iterable[BudgetFacts], previous_reason: str | None, now: datetime) -> Verdict:
    """A run that has started: stop it at a budget's cap, warn at its warnAtFraction
    (``previous_reason``: the TeamBudget condition's reason so far, so the Event is posted once)."""
    v = Verdict()
    budgets = list(budgets)
    for b in budgets:
        if b.exhausted:
            msg = f"team budget {b.name}: spent ${b.spent_usd:.2f} of ${b.cap_usd:.2f} this period"
            v.condition(cond.TEAM_BUDGET, False, EXCEEDED, msg)
            v.stop = Stop(Phase.budget_exceeded, EXCEEDED, msg)
            return v
    for b in budgets:
        v.wake(_next_wake(b, now))
    unknown = next((b for b in budgets if b.unknown is not None), None)
    warned = next((b for b in budgets if b.warning), None)
    if unknown is not None:
        msg = f"team budget {unknown.name}: {unknown.unknown}: no new pods until it can be counted"
        v.condition(cond.TEAM_BUDGET, False, UNKNOWN, msg)
    elif warned is not None:
        msg = (
            f"team budget {warned.name}: spent ${warned.spent_usd:.2f}, "
            f"{warned.spent_usd / warned.cap_usd:.0%} of ${warned.cap_usd:.2f} this period"
        )
        v.condition(cond.TEAM_BUDGET, True, WARNING, msg)
        if previous_reason != WARNING:
            v.event("Warning", WARNING, msg)
    elif budgets:
        names = ", ".join(f"{b.name} (${b.remaining_usd:.2f} left)" for b in budgets)
        v.condition(cond.TEAM_BUDGET, True, WITHIN, f"team budget {names}")
    return v
