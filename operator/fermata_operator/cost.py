"""Cost accounting: accrued spend = Σ over the run's pods of billed node-seconds × hourly price.

Billing of a pod starts at ``status.startTime`` (the node accepted it: image pulls cost GPU
time too) and ends at its container's ``finishedAt`` — or, for a pod deleted before it
reported one, at its deletion. Closed spans are written to ``status.cost.segments``; open ones
are recomputed from pod facts on every reconcile. Trainer pods carry the
``fermata.dev/cost-accounting`` finalizer, which the operator removes only after the pod's
span is closed in status, so an operator restart neither loses nor double-counts a second.

Prices: the run's ``spec.budget.prices`` overrides, then the operator's price table
(a ConfigMap the chart installs, keyed ``<instance-type>/<spot|on-demand>``), then — if
enabled — live AWS prices (:mod:`fermata_operator.aws_prices`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fermata_operator.api import CostSegment, CostStatus, PriceOverride

#: Defaults from the project plan (g4dn.xlarge: $1.30/h on-demand, $0.39/h spot) plus AWS
#: us-east-1 list prices for common single-GPU types. Operators override them in the chart.
DEFAULT_PRICES: dict[str, float] = {
    "g4dn.xlarge/on-demand": 1.30,
    "g4dn.xlarge/spot": 0.39,
    "g4dn.2xlarge/on-demand": 0.752,
    "g4dn.2xlarge/spot": 0.30,
    "g5.xlarge/on-demand": 1.006,
    "g5.xlarge/spot": 0.45,
    "g5.2xlarge/on-demand": 1.212,
    "g5.2xlarge/spot": 0.55,
    "g6.xlarge/on-demand": 0.805,
    "g6.xlarge/spot": 0.35,
    "p3.2xlarge/on-demand": 3.06,
    "p3.2xlarge/spot": 0.92,
}


def price_key(instance_type: str, capacity_type: str) -> str:
    return f"{instance_type}/{capacity_type}"


@dataclass
class PriceTable:
    """Hourly USD prices keyed ``instance-type/capacity-type``."""

    prices: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    #: Optional live source (instance type, capacity) -> price or None.
    live: Callable[[str, str], float | None] | None = None

    @classmethod
    def from_config_map_data(cls, data: Mapping[str, str] | None) -> PriceTable:
        """Parse a ConfigMap's data: ``g4dn.xlarge/spot: "0.39"`` lines (bad lines ignored)."""
        table = dict(DEFAULT_PRICES)
        for key, value in (data or {}).items():
            k = key.replace("_", "/") if "/" not in key else key
            try:
                table[k] = float(value)
            except ValueError:
                continue
        return cls(prices=table)

    def lookup(
        self,
        instance_type: str | None,
        capacity_type: str | None,
        overrides: Iterable[PriceOverride] = (),
    ) -> float | None:
        if not instance_type or not capacity_type:
            return None
        for o in overrides:
            if o.instance_type == instance_type and o.capacity_type.value == capacity_type:
                return o.hourly_usd
        if self.live is not None:
            live = self.live(instance_type, capacity_type)
            if live is not None:
                return live
        return self.prices.get(price_key(instance_type, capacity_type))


@dataclass(frozen=True)
class PodBilling:
    """The billing facts of one pod, read from the pod and its node."""

    pod: str
    node: str | None
    instance_type: str | None
    capacity_type: str | None
    start: datetime | None
    end: datetime | None  # None while it still runs


def _seconds(a: datetime, b: datetime) -> float:
    return max(0.0, (b - a).total_seconds())


def segment_for(billing: PodBilling, price: float, now: datetime) -> CostSegment | None:
    if billing.start is None:
        return None
    end = billing.end or now
    usd = _seconds(billing.start, end) / 3600.0 * price
    return CostSegment(
        pod=billing.pod,
        node=billing.node,
        instance_type=billing.instance_type,
        capacity_type=billing.capacity_type,
        start=billing.start,
        end=billing.end,
        hourly_usd=price,
        usd=round(usd, 6),
    )


@dataclass
class CostResult:
    status: CostStatus
    #: Pods whose span is now closed and recorded (their finalizer may go).
    closed_pods: set[str]
    #: Pods whose price is unknown (no table entry): surfaced as a condition.
    unpriced: list[str]


def compute(
    previous: CostStatus | None,
    pods: Iterable[PodBilling],
    prices: PriceTable,
    overrides: Iterable[PriceOverride],
    budget_usd: float,
    now: datetime,
    projected_remaining_seconds: float | None = None,
) -> CostResult:
    """New cost status from the recorded closed spans plus the pods we can see now."""
    overrides = list(overrides)
    closed: dict[str, CostSegment] = {
        s.pod: s for s in (previous.segments if previous else []) if s.end is not None
    }
    open_segments: list[CostSegment] = []
    unpriced: list[str] = []
    rate = 0.0
    for b in pods:
        if b.pod in closed:
            continue
        price = prices.lookup(b.instance_type, b.capacity_type, overrides)
        if price is None:
            if b.start is not None:
                unpriced.append(f"{b.pod} on {b.instance_type or '?'}/{b.capacity_type or '?'}")
            price = 0.0
        seg = segment_for(b, price, now)
        if seg is None:
            continue
        if seg.end is not None:
            closed[seg.pod] = seg
        else:
            open_segments.append(seg)
            rate += price
    segments = sorted(closed.values(), key=lambda s: s.start) + open_segments
    accrued = round(sum(s.usd for s in segments), 6)
    projected = None
    if projected_remaining_seconds is not None:
        projected = round(accrued + rate * projected_remaining_seconds / 3600.0, 4)
    status = CostStatus(
        accrued_usd=round(accrued, 4),
        hourly_rate_usd=round(rate, 4),
        projected_total_usd=projected,
        budget_usd=budget_usd,
        remaining_usd=round(budget_usd - accrued, 4),
        segments=segments,
        updated=now,
    )
    return CostResult(status=status, closed_pods=set(closed), unpriced=unpriced)


def seconds_until(budget_usd: float, accrued_usd: float, hourly_rate: float) -> float | None:
    """Seconds until spend reaches ``budget_usd`` at the current rate (None if not burning)."""
    if hourly_rate <= 0:
        return None
    return max(0.0, (budget_usd - accrued_usd) / hourly_rate * 3600.0)


def utcnow() -> datetime:
    return datetime.now(UTC)
