"""Cost accounting: billed node-seconds × price, closed spans, the fallback price, projection, ETA."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fermata_api import CapacityType, CostSegment, CostStatus, PriceOverride, TrainerProgress, TrainerState
from fermata_operator.policies import cost
from fermata_operator.policies.cost import PodBilling
from fermata_operator.policies.prices import PriceTable
from tests.operator.factories import T0, training_spec

NOW = T0 + timedelta(hours=3)


def billing(pod: str, start_h: float | None, end_h: float | None = None, **kw: str | None) -> PodBilling:
    return PodBilling(
        pod=pod,
        node=kw.get("node", "n1"),
        instance_type=kw.get("instance_type", "g4dn.xlarge"),
        capacity_type=kw.get("capacity_type", "spot"),
        start=None if start_h is None else T0 + timedelta(hours=start_h),
        end=None if end_h is None else T0 + timedelta(hours=end_h),
    )


def compute(pods: list[PodBilling], previous: CostStatus | None = None, **kw: object) -> cost.CostResult:
    return cost.compute(
        previous,
        pods,
        PriceTable(),
        kw.get("overrides", []),  # type: ignore[arg-type]
        fallback_price=kw.get("fallback", 55.04),  # type: ignore[arg-type]
        budget_usd=100.0,
        now=NOW,
        remaining_seconds=kw.get("remaining"),  # type: ignore[arg-type]
    )


def test_closed_span_billed_exactly() -> None:
    # 1h30m on g4dn.xlarge spot at $0.39/h = $0.585.
    r = compute([billing("demo-0", 0.0, 1.5)])
    (seg,) = r.status.segments
    assert seg.usd == pytest.approx(0.585, abs=1e-9)
    assert seg.hourly_usd == 0.39 and seg.end == T0 + timedelta(hours=1.5)
    assert r.status.accrued_usd == 0.585
    assert r.status.hourly_rate_usd == 0.0  # nothing runs now
    assert r.status.remaining_usd == 99.415
    assert r.closed_pods == {"demo-0"}
    assert r.unpriced == []


def test_open_span_billed_until_now_and_counts_in_the_rate() -> None:
    # Started 2h before NOW on on-demand g5.xlarge ($1.006/h): 7200 s × 1.006 / 3600 = $2.012.
    r = compute([billing("demo-1", 1.0, capacity_type="on-demand", instance_type="g5.xlarge")])
    (seg,) = r.status.segments
    assert seg.end is None and seg.usd == pytest.approx(2.012, abs=1e-9)
    assert r.status.accrued_usd == 2.012
    assert r.status.hourly_rate_usd == 1.006
    assert r.closed_pods == set()
    assert r.status.updated == NOW


def test_seconds_times_price_over_3600_to_the_cent() -> None:
    start = T0 + timedelta(hours=3) - timedelta(seconds=1234)
    b = PodBilling("demo-0", "n1", "p4d.24xlarge", "on-demand", start, None)
    r = compute([b])
    assert r.status.accrued_usd == pytest.approx(round(1234 * 32.773 / 3600, 4))
    assert round(r.status.accrued_usd, 2) == 11.23


def test_closed_span_from_previous_status_is_kept_not_rebilled() -> None:
    old = CostSegment(
        pod="demo-0",
        node="gone",
        instance_type="g4dn.xlarge",
        capacity_type="spot",
        start=T0,
        end=T0 + timedelta(hours=1),
        hourly_usd=0.50,  # the price that applied then
        usd=0.50,
    )
    previous = CostStatus(accrued_usd=0.5, segments=[old])
    # demo-0 is still visible (with a different node and price): its recorded span wins.
    pods = [
        billing("demo-0", 0.0, 2.0, instance_type="p5.48xlarge", capacity_type="on-demand"),
        billing("demo-1", 2.0),
    ]
    r = compute(pods, previous)
    assert [s.pod for s in r.status.segments] == ["demo-0", "demo-1"]
    assert r.status.segments[0] == old
    # $0.50 + 1h × $0.39 = $0.89
    assert r.status.accrued_usd == 0.89
    assert r.status.hourly_rate_usd == 0.39
    assert r.closed_pods == {"demo-0"}


def test_closed_span_kept_when_the_pod_is_gone() -> None:
    old = CostSegment(pod="demo-0", start=T0, end=T0 + timedelta(hours=1), hourly_usd=1.0, usd=1.0)
    open_old = CostSegment(pod="demo-1", start=T0 + timedelta(hours=1), end=None, hourly_usd=1.0, usd=1.0)
    r = compute([], CostStatus(segments=[old, open_old]))
    # The closed span stays; an open span is recomputed from pod facts only.
    assert r.status.segments == [old]
    assert r.status.accrued_usd == 1.0


def test_unknown_price_billed_at_fallback_never_zero() -> None:
    pods = [
        billing("demo-0", 2.0, instance_type="x9.huge"),
        billing("demo-1", 2.0, node=None, instance_type=None, capacity_type=None),
    ]
    r = compute(pods, fallback=10.0)
    assert r.status.accrued_usd == 20.0  # 2 pods × 1h × $10
    assert r.status.hourly_rate_usd == 20.0
    assert all(s.hourly_usd == 10.0 for s in r.status.segments)
    assert r.unpriced == ["demo-0 on x9.huge/spot", "demo-1 on ?/?"]


def test_pod_not_started_is_not_billed_nor_flagged() -> None:
    r = compute([billing("demo-0", None, instance_type="x9.huge")])
    assert r.status.segments == [] and r.status.accrued_usd == 0.0 and r.unpriced == []


def test_override_price_is_used() -> None:
    ov = [PriceOverride(instance_type="g4dn.xlarge", capacity_type=CapacityType.spot, hourly_usd=0.2)]
    r = compute([billing("demo-0", 1.0)], overrides=ov)
    assert r.status.accrued_usd == 0.4
    assert r.status.segments[0].hourly_usd == 0.2


def test_projection_adds_rate_times_remaining() -> None:
    r = compute([billing("demo-0", 0.0, 1.0), billing("demo-1", 2.0)], remaining=7200.0)
    # accrued 0.39 + 0.39; projected + 2h × 0.39
    assert r.status.accrued_usd == 0.78
    assert r.status.projected_total_usd == 1.56
    assert compute([billing("demo-1", 2.0)]).status.projected_total_usd is None


def test_end_before_start_is_zero_not_negative() -> None:
    r = compute([billing("demo-0", 2.0, 1.0)])
    assert r.status.segments[0].usd == 0.0


def _progress(step: int, total: int, sps: float | None) -> TrainerProgress:
    return TrainerProgress(
        state=TrainerState.training, heartbeat_time=T0, step=step, total_steps=total, samples_per_second=sps
    )


def test_samples_per_step_counts_every_rank() -> None:
    s = training_spec(training={"batchSize": 8, "gradientAccumulation": 2}, resources={"gpus": 4})
    assert cost.samples_per_step(s) == 64
    assert cost.samples_per_step(training_spec(resources={"gpus": 0})) == 8


def test_remaining_seconds_counts_world_size() -> None:
    one = training_spec(training={"batchSize": 8}, resources={"gpus": 1})
    four = training_spec(training={"batchSize": 8}, resources={"gpus": 4})
    p = _progress(step=1000, total=2000, sps=16.0)
    assert cost.remaining_seconds(p, one) == 500.0  # 1000 steps × 8 samples / 16 per s
    assert cost.remaining_seconds(p, four) == 2000.0
    assert cost.remaining_seconds(_progress(3000, 2000, 16.0), one) == 0.0


@pytest.mark.parametrize(
    "p", [None, _progress(10, 100, None), _progress(10, 100, 0.0), _progress(10, 0, 5.0)]
)
def test_remaining_seconds_unknown(p: TrainerProgress | None) -> None:
    assert cost.remaining_seconds(p, training_spec()) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (44.6, "45s"),
        (60, "1m"),
        (90, "1m30s"),
        (3 * 3600 + 12 * 60, "3h12m"),
        (3 * 3600 + 12 * 60 + 40, "3h12m"),
        (4 * 86400 + 2 * 3600, "4d2h"),
        (4 * 86400 + 2 * 3600 + 59 * 60, "4d2h"),
        (3600, "1h"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert cost.human_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "allowed"), [(3 * 3600 + 5, {"3h", "3h0m"}), (86400 + 30, {"1d", "1d0h"})]
)
def test_human_duration_two_largest_units_only(seconds: float, allowed: set[str]) -> None:
    assert cost.human_duration(seconds) in allowed


def test_eta() -> None:
    e = cost.eta(3 * 3600 + 12 * 60 + 0.04, hourly_rate_usd=1.5, now=NOW)
    assert e is not None
    assert e.completion_time == NOW + timedelta(seconds=11520.04)
    assert e.remaining_seconds == 11520.0
    assert e.remaining == "3h12m"
    assert e.remaining_cost_usd == 4.8  # 3.2h × $1.5
    assert cost.eta(None, 1.5, NOW) is None
    short = cost.eta(45.0, 3.6, NOW)
    assert short is not None and short.remaining == "45s" and short.remaining_cost_usd == 0.045
