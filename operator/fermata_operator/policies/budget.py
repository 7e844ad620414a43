"""The dollar budget: warn, stop at the budget, and optionally stop on a projected overrun.

Overshoot bound (stated in the README from the configured timeout): the operator wakes at the
moment the accrued cost reaches ``maxUSD`` at the current burn rate (never later than its
resync period) and asks the trainer to checkpoint and exit; a trainer that has not done so
within ``checkpoint_request_timeout_seconds`` (``FERMATA_CHECKPOINT_REQUEST_TIMEOUT_SECONDS``)
gets SIGTERM and the pod's ``terminationGracePeriodSeconds``. So the spend past the budget is
at most ``hourly rate × (reconcile latency + that timeout + grace period) / 3600``
(:func:`overshoot_bound_usd`).
"""

from __future__ import annotations

from fermata_api import BudgetSpec, CostStatus, Phase
from fermata_api import conditions as cond
from fermata_operator.policies.effects import Stop, Verdict


def overshoot_bound_usd(
    hourly_rate: float, request_timeout_s: float, grace_period_s: float, latency_s: float = 5.0
) -> float:
    """The most a run can spend past its budget (see the module docstring)."""
    return hourly_rate * (latency_s + request_timeout_s + grace_period_s) / 3600.0


def evaluate(cost: CostStatus, budget: BudgetSpec, warned: bool) -> Verdict:
    """The budget's verdict; ``warned``: the BudgetWarning condition is already True."""
    accrued, limit = cost.accrued_usd, budget.max_usd
    projected = cost.projected_total_usd
    v = Verdict()
    if accrued >= limit:
        msg = f"spent ${accrued:.2f} of the ${limit:.2f} budget"
        v.condition(cond.BUDGET_EXCEEDED, True, "BudgetExceeded", msg)
        v.stop = Stop(Phase.budget_exceeded, "BudgetExceeded", msg)
        return v
    if budget.stop_on_projected_overrun and projected is not None and projected > limit:
        msg = (
            f"projected total ${projected:.2f} exceeds the ${limit:.2f} budget (spent ${accrued:.2f} so far)"
        )
        v.condition(cond.BUDGET_EXCEEDED, True, "ProjectedOverrun", msg)
        v.stop = Stop(Phase.budget_exceeded, "ProjectedOverrun", msg)
        return v
    if accrued >= budget.warn_at_fraction * limit:
        msg = f"spent ${accrued:.2f}, {accrued / limit:.0%} of the ${limit:.2f} budget"
        v.condition(cond.BUDGET_WARNING, True, "BudgetWarning", msg)
        if not warned:
            v.event("Warning", "BudgetWarning", msg)
    else:
        msg = f"spent ${accrued:.2f} of ${limit:.2f}"
        v.condition(cond.BUDGET_WARNING, False, "WithinBudget", msg)
    v.condition(cond.BUDGET_EXCEEDED, False, "WithinBudget", msg)
    if cost.hourly_rate_usd > 0:
        v.wake(max(1.0, (limit - accrued) / cost.hourly_rate_usd * 3600.0))
    return v
