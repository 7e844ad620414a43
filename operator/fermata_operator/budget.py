"""The dollar budget: warn, stop at the budget, and optionally stop on a projected overrun.

Overshoot bound (documented in the README): the operator wakes at the moment the accrued cost
reaches ``maxUSD`` at the current burn rate (never later than its resync period) and asks the
trainer to checkpoint and exit; a trainer that has not done so within
``FERMATA_CHECKPOINT_REQUEST_TIMEOUT_SECONDS`` (120 s) gets SIGTERM and the pod's
``terminationGracePeriodSeconds`` (150 s). So the spend past the budget is at most
``hourly rate × (reconcile latency + 120 s + 150 s) / 3600``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fermata_operator.api import BudgetSpec, CostStatus


@dataclass(frozen=True)
class BudgetVerdict:
    warn: bool
    exceeded: bool
    projected_overrun: bool
    message: str
    #: Seconds until the budget is reached at the current rate (None: not burning).
    seconds_to_budget: float | None


def evaluate(cost: CostStatus, budget: BudgetSpec) -> BudgetVerdict:
    accrued = cost.accrued_usd
    limit = budget.max_usd
    warn_at = budget.warn_at_fraction * limit
    exceeded = accrued >= limit
    projected = cost.projected_total_usd
    overrun = bool(budget.stop_on_projected_overrun and projected is not None and projected > limit)
    if exceeded:
        message = f"spent ${accrued:.2f} of the ${limit:.2f} budget"
    elif overrun:
        message = (
            f"projected total ${projected:.2f} exceeds the ${limit:.2f} budget (spent ${accrued:.2f} so far)"
        )
    elif accrued >= warn_at:
        message = f"spent ${accrued:.2f}, {accrued / limit:.0%} of the ${limit:.2f} budget"
    else:
        message = f"spent ${accrued:.2f} of ${limit:.2f}"
    seconds = None
    if cost.hourly_rate_usd > 0:
        seconds = max(0.0, (limit - accrued) / cost.hourly_rate_usd * 3600.0)
    return BudgetVerdict(
        warn=accrued >= warn_at,
        exceeded=exceeded,
        projected_overrun=overrun and not exceeded,
        message=message,
        seconds_to_budget=seconds,
    )
