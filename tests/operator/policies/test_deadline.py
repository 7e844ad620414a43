"""``spec.deadline``: the run's wall-clock limit from its first pod's start."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fermata_api import Decision, Phase
from fermata_operator.policies import deadline
from fermata_operator.policies.effects import Stop
from tests.operator.factories import T0, training_spec

SPEC = training_spec(deadline="1d12h")  # 129600 s


def test_seconds_left() -> None:
    assert deadline.seconds_left(SPEC, T0, T0) == 129600.0
    assert deadline.seconds_left(SPEC, T0, T0 + timedelta(days=1)) == 43200.0
    assert deadline.seconds_left(SPEC, T0, T0 + timedelta(days=2)) == -43200.0


def test_no_deadline_or_not_started() -> None:
    assert deadline.seconds_left(training_spec(), T0, T0 + timedelta(days=90)) is None
    assert deadline.seconds_left(SPEC, None, T0) is None
    for v in (
        deadline.evaluate(training_spec(), T0, T0 + timedelta(days=90)),
        deadline.evaluate(SPEC, None, T0),
    ):
        assert v.stop is None and v.wake_in is None


def test_wakes_at_the_deadline() -> None:
    v = deadline.evaluate(SPEC, T0, T0 + timedelta(hours=30))
    assert v.stop is None and v.conditions == []
    assert v.wake_in == 6 * 3600.0


@pytest.mark.parametrize("past", [timedelta(0), timedelta(seconds=1), timedelta(days=3)])
def test_stops_at_and_after_the_deadline(past: timedelta) -> None:
    v = deadline.evaluate(SPEC, T0, T0 + timedelta(hours=36) + past)
    assert v.stop == Stop(Phase.stopped, "DeadlineExceeded", "deadline 1d12h reached", Decision.no_go)
    assert v.wake_in is None
