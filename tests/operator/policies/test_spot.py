"""Spot recovery: exponential backoff, capacity for the next pod, the interruption budget."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from fermata_api import CapacityType, Decision, Phase, TrainingRunSpec
from fermata_api import conditions as cond
from fermata_operator.policies import spot
from fermata_operator.policies.effects import Event, SetCondition, Stop
from fermata_operator.policies.pod_outcome import Kind, Outcome
from tests.operator.factories import T0, training_spec

LOST = Outcome(Kind.interrupted, "NodeDeleted", "pod lost: NodeDeleted", None, True)


def s(**kw: Any) -> TrainingRunSpec:
    return training_spec(**kw)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.0), (-1, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (6, 320.0), (7, 600.0), (50, 600.0)],
)
def test_backoff_seconds(attempt: int, expected: float) -> None:
    assert spot.backoff_seconds(attempt, 10, 600) == expected


def test_backoff_without_a_base_is_zero() -> None:
    assert spot.backoff_seconds(3, 0, 600) == 0.0
    assert spot.backoff_seconds(3, 10, 0) == 0.0


def test_on_demand_spec_is_always_on_demand() -> None:
    spec = s(resources={"capacity": "on-demand"})
    assert spot.capacity_for(spec, 0, None, T0, None) == (
        CapacityType.on_demand,
        "spec.resources.capacity is on-demand",
    )


def test_fallback_after_n_interruptions() -> None:
    spec = s(spot={"fallbackToOnDemandAfter": 3})
    assert spot.capacity_for(spec, 2, T0, T0, None) == (CapacityType.spot, "spot")
    assert spot.capacity_for(spec, 3, T0, T0, None) == (
        CapacityType.on_demand,
        "3 spot interruptions (fallback after 3)",
    )
    assert spot.capacity_for(spec, 5, T0, T0, None)[0] is CapacityType.on_demand


def test_no_fallback_when_zero() -> None:
    spec = s(spot={"fallbackToOnDemandAfter": 0})
    assert spot.capacity_for(spec, 9, T0, T0, None)[0] is CapacityType.spot


def test_deadline_cushion() -> None:
    spec = s(deadline="10h", spot={"fallbackToOnDemandAfter": 0})
    now = T0 + timedelta(hours=2)  # 8h = 28800 s left
    # 28800 s cover 23040 s × 1.25 exactly: still spot.
    assert spot.capacity_for(spec, 0, T0, now, 23040.0) == (CapacityType.spot, "spot")
    cap, why = spot.capacity_for(spec, 0, T0, now, 23041.0)
    assert cap is CapacityType.on_demand
    assert why == "deadline 10h leaves 28800s for ~23041s of training"
    # Unknown training left or not started: no deadline reasoning.
    assert spot.capacity_for(spec, 0, T0, now, None)[0] is CapacityType.spot
    assert spot.capacity_for(spec, 0, None, now, 1e9)[0] is CapacityType.spot
    assert spot.DEADLINE_CUSHION == 1.25


def test_interruption_under_the_limit_waits_and_recreates() -> None:
    spec = s(spot={"maxInterruptions": 4, "fallbackToOnDemandAfter": 2, "backoffSeconds": 15})
    v, delay = spot.on_interruption(spec, 3, "demo-2", LOST)
    assert delay == 60.0  # 15 · 2^(3-1)
    assert v.conditions == [SetCondition(cond.INTERRUPTED, True, "NodeDeleted", "pod lost: NodeDeleted")]
    assert v.events == [
        Event(
            "Warning",
            "Interrupted",
            "pod demo-2 lost (NodeDeleted); interruption 3/4, new pod in 60s from the last checkpoint",
        )
    ]
    assert v.stop is None
    _, at_limit = spot.on_interruption(spec, 4, "demo-3", LOST)
    assert at_limit == 120.0


def test_interruption_over_the_limit_fails_the_run() -> None:
    spec = s(spot={"maxInterruptions": 4, "fallbackToOnDemandAfter": 2})
    v, delay = spot.on_interruption(spec, 5, "demo-4", LOST)
    msg = "5 spot interruptions exceed spot.maxInterruptions=4"
    assert delay == 0.0
    assert v.stop == Stop(Phase.failed, "TooManyInterruptions", msg, Decision.no_go)
    assert SetCondition(cond.FAILED, True, "TooManyInterruptions", msg) in v.conditions
    assert v.conditions[0].type == cond.INTERRUPTED and v.conditions[0].status is True
    assert v.events == []


def test_zero_interruptions_allowed() -> None:
    spec = s(spot={"maxInterruptions": 0, "fallbackToOnDemandAfter": 0})
    v, _ = spot.on_interruption(spec, 1, "demo-0", LOST)
    assert v.stop is not None and v.stop.reason == "TooManyInterruptions"
