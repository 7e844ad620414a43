"""``spec.ttlSecondsAfterFinished``: when a finished run's objects are deleted."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fermata_api import Phase
from fermata_api import conditions as cond
from fermata_operator.policies import cleanup
from tests.operator.factories import T0, training_spec

TTL = training_spec(ttlSecondsAfterFinished=600)
TTL_AND_RUN = training_spec(ttlSecondsAfterFinished=0, cleanup={"deleteRun": True})


def test_nothing_without_a_ttl_or_before_the_end() -> None:
    assert cleanup.evaluate(training_spec(), Phase.succeeded, T0, None, T0 + timedelta(days=9)) == (
        cleanup.CleanupVerdict()
    )
    for phase in (None, Phase.pending, Phase.running, Phase.suspended):
        assert cleanup.evaluate(TTL, phase, T0, None, T0 + timedelta(days=9)) == cleanup.CleanupVerdict()
    assert cleanup.evaluate(TTL, Phase.failed, None, None, T0) == cleanup.CleanupVerdict()


def test_wakes_when_the_ttl_expires() -> None:
    v = cleanup.evaluate(TTL, Phase.succeeded, T0, None, T0 + timedelta(seconds=200))
    assert not v.clean and not v.delete_run and v.wake_in == 400.0


@pytest.mark.parametrize("phase", sorted(cleanup.TERMINAL_PHASES, key=lambda p: p.value))
@pytest.mark.parametrize("after", [600, 601, 86400])
def test_cleans_every_terminal_phase_once_the_ttl_passed(phase: Phase, after: int) -> None:
    v = cleanup.evaluate(TTL, phase, T0, None, T0 + timedelta(seconds=after))
    assert v == cleanup.CleanupVerdict(clean=True)


def test_once_only_and_the_run_too_when_asked() -> None:
    later = T0 + timedelta(seconds=5)
    assert cleanup.evaluate(TTL, Phase.stopped, T0, T0, later) == cleanup.CleanupVerdict()
    assert cleanup.evaluate(TTL_AND_RUN, Phase.stopped, T0, None, T0) == cleanup.CleanupVerdict(
        clean=True, delete_run=True
    )
    # Already cleaned up: only the run's own deletion is left (repeated until it is gone).
    assert cleanup.evaluate(TTL_AND_RUN, Phase.stopped, T0, T0, later) == cleanup.CleanupVerdict(
        delete_run=True
    )


def test_recorded_as_a_condition_and_an_event() -> None:
    condition, event = cleanup.recorded(600, False)
    assert (condition.type, condition.status, condition.reason) == (cond.CLEANED_UP, True, "TTLExpired")
    assert (event.type, event.reason) == ("Normal", "CleanedUp")
    assert "600s" in event.message and "status, cost history and artifacts kept" in event.message
    assert "deleting the TrainingRun" in cleanup.recorded(0, True)[1].message


def test_the_spec_refuses_a_negative_ttl() -> None:
    with pytest.raises(ValueError):
        training_spec(ttlSecondsAfterFinished=-1)


# ----------------------------------------------------------------------------- in the planner


def test_the_planner_cleans_a_finished_run_once_its_pods_settled() -> None:
    from fermata_api.meta import POD_FINALIZER
    from tests.operator.factories import pod_for, run, running, terminated
    from tests.operator.test_planner import step

    r = run(ttlSecondsAfterFinished=60)
    step(r, [], timedelta(0))
    pod = terminated(running(pod_for(r), "spot-1", T0), 0, T0 + timedelta(hours=1))
    pod["metadata"]["uid"] = "pod-uid"
    p = step(r, [pod], timedelta(hours=1, seconds=5))
    assert r["status"]["phase"] == "Succeeded" and p.release_finalizers == ["demo-0"]
    assert p.cleanup == [] and "cleanedUp" not in r["status"]
    # The finalizer released: the TTL clock is what wakes the run.
    pod["metadata"]["finalizers"] = [f for f in pod["metadata"].get("finalizers", []) if f != POD_FINALIZER]
    p = step(r, [pod], timedelta(hours=1, seconds=10))
    assert p.cleanup == [] and p.requeue_after == pytest.approx(50.0)  # completionTime: the pod's end
    p = step(r, [pod], timedelta(hours=1, seconds=66))
    # The run has no objects of its own but its pods: the namespace's trainer identity stays.
    assert p.cleanup == [("Pod", "demo-0")]
    assert p.uids["demo-0"] == "pod-uid" and not p.delete_run and p.requeue_after is None
    assert [e.reason for e in p.events] == ["CleanedUp"]
    assert r["status"]["cleanedUp"] and r["status"]["cost"]["segments"]  # the cost history stays
    assert next(c for c in r["status"]["conditions"] if c["type"] == "CleanedUp")["status"] == "True"
    # Done once: the next pass (the pod gone) does nothing more.
    p = step(r, [], timedelta(hours=1, seconds=70))
    assert p.cleanup == [] and p.events == [] and p.requeue_after is None
