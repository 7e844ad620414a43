"""Cost accounting: accrued spend = Σ over the run's pods of billed node-seconds × hourly price.

Billing of a pod starts at ``status.startTime`` (the node accepted it: image pulls cost GPU
time too) and ends at its container's ``finishedAt`` — or, for a pod deleted before it
reported one, at its deletion. Closed spans are written to ``status.cost.segments``; open ones
are recomputed from pod facts on every reconcile. Trainer pods carry the
``fermata.dev/cost-accounting`` finalizer, which the operator removes only after the pod's
span is closed in status, so an operator restart neither loses nor double-counts a second.

A pod whose node's price cannot be found is billed at the highest price the run could pay
(:func:`fermata_operator.policies.prices.worst_case`), never at $0, and flagged.

The projection and the ETA count every rank: the trainer reports global samples per second,
and one optimizer step consumes ``batchSize × gradientAccumulation × gpus`` samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from fermata_api import CostSegment, CostStatus, Eta, PriceOverride, TrainerProgress, TrainingRunSpec
from fermata_operator.policies.prices import PriceTable


@dataclass(frozen=True)
class PodBilling:
    """The billing facts of one pod, read from the pod and its node."""

    pod: str
    node: str | None
    instance_type: str | None
    capacity_type: str | None
    start: datetime | None
    end: datetime | None  # None while it still runs


@dataclass
class CostResult:
    status: CostStatus
    #: Pods whose span is now closed and recorded (their finalizer may go).
    closed_pods: set[str]
    #: Pods billed at the fallback price because their own is unknown.
    unpriced: list[str]


def _seconds(a: datetime, b: datetime) -> float:
    return max(0.0, (b - a).total_seconds())


def segment_for(billing: PodBilling, price: float, now: datetime) -> CostSegment | None:
    if billing.start is None:
        return None
    end = billing.end or now
    return CostSegment(
        pod=billing.pod,
        node=billing.node,
        instance_type=billing.instance_type,
        capacity_type=billing.capacity_type,
        start=billing.start,
        end=billing.end,
        hourly_usd=price,
        usd=round(_seconds(billing.start, end) / 3600.0 * price, 6),
    )


def compute(
    previous: CostStatus | None,
    pods: Iterable[PodBilling],
    prices: PriceTable,
    overrides: Iterable[PriceOverride],
    fallback_price: float,
    budget_usd: float,
    now: datetime,
    remaining_seconds: float | None = None,
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
            price = fallback_price
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
    if remaining_seconds is not None:
        projected = round(accrued + rate * remaining_seconds / 3600.0, 4)
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


def samples_per_step(spec: TrainingRunSpec) -> int:
    """Samples one optimizer step consumes across all ranks."""
    t = spec.training
    return t.batch_size * t.gradient_accumulation * max(1, spec.resources.gpus)


def remaining_seconds(progress: TrainerProgress | None, spec: TrainingRunSpec) -> float | None:
    """Seconds of training left at the reported (global) throughput; None if unknown."""
    if progress is None or not progress.samples_per_second or not progress.total_steps:
        return None
    steps_left = max(0, progress.total_steps - progress.step)
    return steps_left * samples_per_step(spec) / progress.samples_per_second


def human_duration(seconds: float) -> str:
    """``3h12m``, ``4d2h``, ``3h``, ``45s`` — the largest unit and, if not zero, the next one."""
    s = max(0, int(round(seconds)))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if s >= size or unit == "s":
            text = f"{s // size}{unit}"
            if i + 1 < len(units):
                nxt, nsize = units[i + 1]
                rest = (s % size) // nsize
                if rest:
                    text += f"{rest}{nxt}"
            return text
    return "0s"


def eta(remaining: float | None, hourly_rate_usd: float, now: datetime) -> Eta | None:
    """Completion time and remaining cost at the measured throughput and the current burn rate."""
    if remaining is None:
        return None
    return Eta(
        completion_time=now + timedelta(seconds=remaining),
        remaining_seconds=round(remaining, 1),
        remaining=human_duration(remaining),
        remaining_cost_usd=round(hourly_rate_usd * remaining / 3600.0, 4),
    )
