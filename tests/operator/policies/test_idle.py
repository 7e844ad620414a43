"""Idle detection: stale heartbeat, no progress, low GPU; the preparation allowance; the clocks."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from fermata_api import IdleSpec, IdleTracking, Phase, TrainerProgress
from fermata_api import conditions as cond
from fermata_operator.policies import idle
from fermata_operator.policies.effects import SetCondition, Stop, Verdict
from tests.operator.factories import T0, progress

SPEC = IdleSpec(timeout="2h", min_gpu_utilization=0.5, preparation_timeout="12h")
POD = "demo-0"


def at(h: float = 0, m: float = 0, s: float = 0) -> datetime:
    return T0 + timedelta(hours=h, minutes=m, seconds=s)


def report(step: int, when: datetime, pod: str = POD, **extra: Any) -> TrainerProgress:
    return TrainerProgress.model_validate(progress(step, 10_000, when, pod=pod, **extra))


def preparing(when: datetime, state: str = "Preparing", **extra: Any) -> TrainerProgress:
    return report(0, when, state=state, gpuUtilization=0.0, **extra)


def check(
    p: TrainerProgress | None, t: IdleTracking | None, now: datetime, pod: str = POD, started: datetime = T0
) -> tuple[Verdict, IdleTracking]:
    return idle.evaluate(SPEC, p, t, pod, started, now)


def idle_reason(v: Verdict) -> str:
    (c,) = v.conditions
    assert c.type == cond.IDLE
    assert c.status is True, f"not idle: {c}"
    assert v.stop is not None and v.stop.phase is Phase.idle_stopped and v.stop.reason == "Idle"
    assert v.stop.message == c.message
    return c.reason


def not_idle(v: Verdict, reason: str = "Active") -> float:
    (c,) = v.conditions
    assert c == SetCondition(
        cond.IDLE, False, reason, "preparing" if reason == "Preparing" else "training is progressing"
    )
    assert v.stop is None
    assert v.wake_in is not None
    return v.wake_in


def test_heartbeat_stale() -> None:
    v, _ = check(report(5, at(m=10)), None, at(h=2, m=10))
    assert idle_reason(v) == "HeartbeatStale"
    assert v.stop == Stop(
        Phase.idle_stopped, "Idle", "no report from the trainer for 7200s (idle timeout 2h)"
    )


def test_trainer_that_never_reports_is_stale_from_the_pod_start() -> None:
    v, _ = check(None, None, at(h=1))
    assert not_idle(v) == 3600.0
    v, _ = check(None, None, at(h=2))
    assert idle_reason(v) == "HeartbeatStale"


def test_no_progress() -> None:
    _, t = check(report(5, at(m=10)), None, at(m=10))
    assert t.step == 5 and t.step_since == at(m=10)
    v, t = check(report(5, at(h=2, m=9)), t, at(h=2, m=9))
    assert not_idle(v) == 60.0
    v, _ = check(report(5, at(h=2, m=10)), t, at(h=2, m=10))
    assert idle_reason(v) == "NoProgress"
    assert v.conditions[0].message == "step 5 has not advanced for 7200s (idle timeout 2h)"


def test_advancing_step_restarts_the_clock() -> None:
    _, t = check(report(5, at(m=10)), None, at(m=10))
    _, t = check(report(6, at(h=2)), t, at(h=2))
    assert t.step == 6 and t.step_since == at(h=2)
    v, _ = check(report(6, at(h=3)), t, at(h=3))
    assert not_idle(v) == 3600.0


def test_low_gpu_utilization() -> None:
    _, t = check(report(1, at(m=10), gpuUtilization=0.1), None, at(m=10))
    assert t.low_gpu_since == at(m=10)
    _, t = check(report(2, at(h=1), gpuUtilization=0.1), t, at(h=1))
    assert t.low_gpu_since == at(m=10)
    v, _ = check(report(3, at(h=2, m=10), gpuUtilization=0.2), t, at(h=2, m=10))
    assert idle_reason(v) == "LowGpuUtilization"
    assert v.conditions[0].message == "GPU utilisation 20% under 50% for 7200s (idle timeout 2h)"


def test_gpu_back_above_the_threshold_resets_the_low_clock() -> None:
    _, t = check(report(1, at(m=10), gpuUtilization=0.1), None, at(m=10))
    _, t = check(report(2, at(h=1), gpuUtilization=0.9), t, at(h=1))
    assert t.low_gpu_since is None
    _, t = check(report(3, at(h=1, m=30), gpuUtilization=0.1), t, at(h=1, m=30))
    v, _ = check(report(4, at(h=2, m=10), gpuUtilization=0.1), t, at(h=2, m=10))
    assert not_idle(v) == pytest.approx(3600 + 20 * 60)  # low since 1h30m


@pytest.mark.parametrize("state", ["Preparing", "Tokenizing"])
def test_preparation_is_not_idle_far_past_the_timeout(state: str) -> None:
    _, t = check(preparing(at(m=1), state), None, at(m=1))
    assert t.preparing_since == T0  # preparation began with the pod
    v, t = check(preparing(at(h=10), state), t, at(h=10))
    # Heartbeat fresh: 2h; preparation: 12h - 10h = 2h; GPU unused and step 0 do not count.
    assert not_idle(v, "Preparing") == 7200.0
    assert t.low_gpu_since is None
    v, t = check(preparing(at(h=11, m=30), state), t, at(h=11, m=30))
    assert not_idle(v, "Preparing") == 1800.0  # the preparation clock is nearer
    v, _ = check(preparing(at(h=12), state), t, at(h=12))
    assert idle_reason(v) == "PreparationTooLong"
    assert v.conditions[0].message == f"still {state} after 43200s (idle.preparationTimeout 12h)"


def test_preparation_after_training_was_seen_starts_its_clock_then() -> None:
    _, t = check(report(0, at(m=5)), None, at(m=5))
    assert t.step_since == at(m=5)
    _, t = check(preparing(at(h=1)), t, at(h=1))
    assert t.preparing_since == at(h=1)
    v, _ = check(preparing(at(h=12, m=59)), t, at(h=12, m=59))
    assert not_idle(v, "Preparing") == 60.0


def test_preparing_then_tokenizing_keeps_one_preparation_clock() -> None:
    _, t = check(preparing(at(m=1)), None, at(m=1))
    _, t = check(preparing(at(h=6), "Tokenizing"), t, at(h=6))
    assert t.preparing_since == T0
    v, _ = check(preparing(at(h=12), "Tokenizing"), t, at(h=12))
    assert idle_reason(v) == "PreparationTooLong"


def test_stale_heartbeat_counts_during_preparation() -> None:
    _, t = check(preparing(at(m=1)), None, at(m=1))
    v, _ = check(preparing(at(m=1)), t, at(h=2, m=1))
    assert idle_reason(v) == "HeartbeatStale"


def test_no_progress_clock_starts_when_preparation_ends() -> None:
    _, t = check(preparing(at(m=1)), None, at(m=1))
    _, t = check(preparing(at(h=5)), t, at(h=5))
    v, t = check(report(0, at(h=5, m=1), gpuUtilization=0.9), t, at(h=5, m=1))
    # From the pod's start it would be 5h without a step; from the end of preparation, 1 minute.
    assert not_idle(v) == pytest.approx(7200 - 60)
    assert t.preparing_since is None
    v, t = check(report(0, at(h=6, m=59), gpuUtilization=0.9), t, at(h=6, m=59))
    assert not_idle(v) == 60.0
    v, _ = check(report(0, at(h=7), gpuUtilization=0.9), t, at(h=7))
    assert idle_reason(v) == "NoProgress"


def test_low_gpu_clock_starts_when_preparation_ends() -> None:
    _, t = check(preparing(at(m=1)), None, at(m=1))
    _, t = check(preparing(at(h=5)), t, at(h=5))
    _, t = check(report(1, at(h=5, m=1), gpuUtilization=0.1), t, at(h=5, m=1))
    assert t.low_gpu_since == at(h=5, m=1)
    v, _ = check(report(2, at(h=6), gpuUtilization=0.1), t, at(h=6))
    assert not_idle(v) == pytest.approx(7200 - 59 * 60)


def test_report_from_another_pod_is_ignored() -> None:
    old_tracking = IdleTracking(pod="demo-0", step=900, step_since=at(h=1))
    stale_report = report(900, at(h=2), pod="demo-0")
    v, t = check(stale_report, old_tracking, at(h=2), pod="demo-1", started=at(h=1))
    assert t.pod == "demo-1" and t.step is None  # the old pod's clocks are not reused
    assert not_idle(v) == 3600.0  # stale since demo-1 started, not since the fresh report
    v, _ = check(stale_report, t, at(h=3), pod="demo-1", started=at(h=1))
    assert idle_reason(v) == "HeartbeatStale"


def test_wake_in_is_the_earliest_clock() -> None:
    t = IdleTracking(pod=POD, step=10, step_since=at(h=1), low_gpu_since=at(m=30))
    v, t2 = check(report(10, at(h=1, m=50), gpuUtilization=0.1), t, at(h=1, m=55))
    # heartbeat: 2h - 5m = 6900 s; step: 2h - 55m = 3900 s; low GPU: 2h - 1h25m = 2100 s
    assert not_idle(v) == 2100.0
    assert t2 == t


def test_wake_in_is_at_least_one_second() -> None:
    t = IdleTracking(pod=POD, step=10, step_since=at(m=0, s=0.5))
    v, _ = check(report(10, at(h=2)), t, at(h=2))
    assert not_idle(v) == 1.0
