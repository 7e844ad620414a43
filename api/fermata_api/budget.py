"""The ``TrainingBudget`` API (``fermata.dev/v1alpha1``): a team's dollar cap per period over the
TrainingRuns of its namespace that its label selector picks.

The operator sums, over the selected runs, the cost of their billed spans
(``status.cost.segments``) clipped to the current period (a calendar month, ISO week or day, in
UTC); a run whose first hour the remaining budget cannot cover gets no pod, and once the cap is
reached the selected running runs are stopped after a checkpoint (``TeamBudgetExceeded``).
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import ConfigDict, Field

from fermata_api.base import ApiModel, cel
from fermata_api.status import Condition


class BudgetPeriod(str, Enum):
    monthly = "monthly"
    weekly = "weekly"
    daily = "daily"


class SelectorOperator(str, Enum):
    in_ = "In"
    not_in = "NotIn"
    exists = "Exists"
    does_not_exist = "DoesNotExist"


class SelectorRequirement(ApiModel):
    """One requirement of a label selector (as in a Deployment's selector)."""

    model_config = cel(
        (
            "self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : size(self.values) == 0",
            "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
        )
    )

    key: str = Field(min_length=1, max_length=317, description="The label key.")
    operator: SelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[str] = Field(default_factory=list, max_length=64, description="Label values.")


class LabelSelector(ApiModel):
    """Which TrainingRuns of the namespace count against the budget (empty: all of them)."""

    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels a run must carry with these values."
    )
    match_expressions: list[SelectorRequirement] = Field(
        default_factory=list, max_length=32, description="Further requirements (all must hold)."
    )


class TrainingBudgetSpec(ApiModel):
    """A dollar cap per period over the namespace's TrainingRuns that ``selector`` picks."""

    model_config = cel(
        ("self.periodUSD > 0.0", "periodUSD must be greater than 0", ".periodUSD"),
        (
            "self.warnAtFraction > 0.0 && self.warnAtFraction <= 1.0",
            "warnAtFraction must be in (0, 1]",
            ".warnAtFraction",
        ),
    )

    period_usd: float = Field(
        gt=0, le=100_000_000, description="Cap in US dollars on the selected runs' spend in one period."
    )
    period: BudgetPeriod = Field(
        default=BudgetPeriod.monthly,
        description="monthly (calendar month), weekly (ISO week, from Monday) or daily; all in UTC.",
    )
    selector: LabelSelector = Field(
        default_factory=LabelSelector,
        description="Label selector over the namespace's TrainingRuns; empty selects every run.",
    )
    warn_at_fraction: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Raise the Warning condition and an Event (on the budget and its runs) at this share.",
    )


class RunSpend(ApiModel):
    """One selected run's spend in the current period."""

    name: str = Field(description="TrainingRun name.")
    spent_usd: float = Field(ge=0, description="Cost of its billed spans within the period.")
    hourly_rate_usd: float = Field(default=0.0, ge=0, description="Its current burn rate.")


class TrainingBudgetStatus(ApiModel):
    """What the operator computed for the current period."""

    model_config = ConfigDict(
        alias_generator=ApiModel.model_config.get("alias_generator"),
        populate_by_name=True,
        extra="ignore",
    )

    observed_generation: int | None = Field(default=None, description="Spec generation acted on.")
    period_start: datetime | None = Field(default=None, description="Start of the current period (UTC).")
    period_end: datetime | None = Field(default=None, description="End of the current period (UTC).")
    cap_usd: float | None = Field(default=None, description="spec.periodUSD.")
    spent_usd: float = Field(default=0.0, ge=0, description="Spend of the selected runs in the period.")
    remaining_usd: float | None = Field(default=None, description="cap - spent (never below 0).")
    hourly_rate_usd: float = Field(default=0.0, ge=0, description="Current burn rate of the selected runs.")
    runs: list[RunSpend] = Field(
        default_factory=list,
        description="Spend by run (selected runs with spend in the period, or running).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Warning (spend at warnAtFraction) and Exhausted (cap reached).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    message: str | None = Field(default=None, description="Human-readable summary.")
    updated: datetime | None = Field(default=None, description="When the spend was computed.")


def budget_printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Cap", "type": "number", "format": "float", "jsonPath": ".spec.periodUSD"},
        {"name": "Spent", "type": "number", "format": "float", "jsonPath": ".status.spentUSD"},
        {"name": "Remaining", "type": "number", "format": "float", "jsonPath": ".status.remainingUSD"},
        {"name": "Period", "type": "string", "jsonPath": ".spec.period"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
