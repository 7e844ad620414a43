"""Application failures: their own budget and backoff; config errors fail at once."""

from __future__ import annotations

from fermata_api import Decision, Phase
from fermata_api import conditions as cond
from fermata_operator.policies import retry
from fermata_operator.policies.effects import Event, SetCondition, Stop
from fermata_operator.policies.pod_outcome import Kind, Outcome
from tests.operator.factories import training_spec

OOM = Outcome(Kind.failed, "OOMKilled", "trainer exited with code 137 (OOMKilled)", 137)
BAD = Outcome(Kind.config_error, "TrainerConfigError", "dataset has no clips", 2)


def test_failure_under_the_limit_retries_with_backoff() -> None:
    spec = training_spec(failures={"maxRetries": 3, "backoffSeconds": 30})
    v, delay = retry.on_failure(spec, 2, OOM)
    assert delay == 60.0
    assert v.stop is None
    assert v.conditions == [SetCondition(cond.INTERRUPTED, False, "Failure", OOM.message)]
    assert v.events == [
        Event("Warning", "TrainerFailed", "trainer exited with code 137 (OOMKilled); retry 2/3 in 60s")
    ]
    assert retry.on_failure(spec, 3, OOM)[1] == 120.0


def test_backoff_capped_at_an_hour() -> None:
    spec = training_spec(failures={"maxRetries": 100, "backoffSeconds": 3600})
    assert retry.on_failure(spec, 5, OOM)[1] == retry.MAX_BACKOFF_SECONDS == 3600.0


def test_failure_over_the_limit_fails_the_run() -> None:
    spec = training_spec(failures={"maxRetries": 1})
    _, first = retry.on_failure(spec, 1, OOM)
    assert first == 30.0  # the default backoff
    v, delay = retry.on_failure(spec, 2, OOM)
    assert delay == 0.0
    assert v.stop == Stop(Phase.failed, "TrainerFailed", OOM.message, Decision.no_go)
    assert SetCondition(cond.FAILED, True, "OOMKilled", OOM.message) in v.conditions
    assert v.events == []


def test_no_retries_allowed() -> None:
    v, _ = retry.on_failure(training_spec(failures={"maxRetries": 0}), 1, OOM)
    assert v.stop is not None and v.stop.phase is Phase.failed


def test_config_error_stops_at_once() -> None:
    v = retry.on_config_error(BAD)
    assert v.stop == Stop(Phase.failed, "TrainerConfigError", "dataset has no clips", Decision.no_go)
    assert v.conditions == [SetCondition(cond.FAILED, True, "TrainerConfigError", "dataset has no clips")]
    assert v.wake_in is None
