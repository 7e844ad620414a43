"""Early stopping: count each evaluation once, track the best, stop after N without improvement."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fermata_api import Decision, EvaluationHistory, GateSpec, Phase, PlateauSpec, TrainerProgress
from fermata_operator.policies import plateau
from fermata_operator.policies.gates import Metrics
from tests.operator.factories import T0, progress

NOW = T0 + timedelta(hours=5)


def evaluation(step: int, loss: float | None) -> TrainerProgress:
    return TrainerProgress.model_validate(
        progress(step, 10_000, NOW, evaluatedStep=step, validationLoss=loss, baselineValidationLoss=5.0)
    )


def feed(points: list[tuple[int, float]], min_improvement: float = 0.0) -> EvaluationHistory | None:
    h: EvaluationHistory | None = None
    for step, loss in points:
        h = plateau.track(h, evaluation(step, loss), min_improvement)
    return h


def test_first_evaluation_is_the_first_best() -> None:
    h = feed([(0, 5.0)])
    assert h == EvaluationHistory(count=1, last_step=0, best_validation_loss=5.0, best_step=0, since_best=0)


def test_each_evaluated_step_counts_once() -> None:
    h = feed([(0, 5.0), (0, 5.0), (500, 4.0), (500, 4.0), (500, 4.0)])
    assert h is not None and h.count == 2 and h.last_step == 500


def test_older_step_after_a_resume_is_not_counted() -> None:
    h = feed([(0, 5.0), (500, 4.0), (1000, 4.5), (800, 3.0)])
    assert h is not None
    assert (h.count, h.last_step, h.best_validation_loss, h.since_best) == (3, 1000, 4.0, 1)


def test_reports_without_an_evaluation_leave_the_history() -> None:
    h = feed([(0, 5.0)])
    no_eval = TrainerProgress.model_validate(progress(42, 10_000, NOW))
    assert plateau.track(h, no_eval) is h
    assert plateau.track(h, None) is h
    assert plateau.track(None, no_eval) is None
    no_loss = evaluation(100, None)
    assert plateau.track(h, no_loss) is h


def test_best_and_since_best_move() -> None:
    h = feed([(0, 5.0), (500, 4.0), (1000, 4.1), (1500, 4.0)])
    assert h is not None
    assert (h.best_validation_loss, h.best_step, h.since_best, h.count) == (4.0, 500, 2, 4)
    h = plateau.track(h, evaluation(2000, 3.9))
    assert h is not None
    assert (h.best_validation_loss, h.best_step, h.since_best, h.count) == (3.9, 2000, 0, 5)


def test_min_improvement_is_relative_to_the_best() -> None:
    # 1% better than 4.0 means below 3.96.
    h = feed([(0, 4.0), (500, 3.97)], min_improvement=0.01)
    assert h is not None and (h.best_validation_loss, h.since_best) == (4.0, 1)
    h = plateau.track(h, evaluation(1000, 3.95), 0.01)
    assert h is not None and (h.best_validation_loss, h.best_step, h.since_best) == (3.95, 1000, 0)


GATE = GateSpec.model_validate(
    {"name": "quality", "at": {"step": 100}, "require": {"maxValidationLoss": 4.5}}
)


def stalled() -> EvaluationHistory:
    h = feed([(0, 5.0), (500, 4.0), (1000, 4.2), (1500, 4.1), (2000, 4.05)])
    assert h is not None and h.since_best == 3
    return h


@pytest.mark.parametrize(
    ("loss", "gates", "decision", "final_reason"),
    [
        (4.05, [GATE], Decision.go, "quality: all thresholds met"),
        (4.9, [GATE], Decision.no_go, "quality: validationLoss misses its threshold"),
        (4.05, [], Decision.go, "completed; no gates defined"),
    ],
)
def test_stops_after_n_evaluations_without_improvement(
    loss: float, gates: list[GateSpec], decision: Decision, final_reason: str
) -> None:
    m = Metrics(loss, None, 12.0, 2000, 1, 2000, 5.0)
    v = plateau.evaluate(PlateauSpec(evaluations=3), stalled(), gates, m, NOW)
    assert v.stop is not None
    assert v.stop.phase is Phase.stopped
    assert v.stop.reason == "Plateau"
    assert v.stop.decision is decision
    assert v.stop.message == (
        "validation loss has not improved for 3 evaluations (best 4.0000 at step 500; "
        f"plateau.evaluations=3); final: {final_reason}"
    )


def test_no_stop_before_n() -> None:
    m = Metrics(4.05, None, 12.0, 2000, 1, 2000, 5.0)
    v = plateau.evaluate(PlateauSpec(evaluations=4), stalled(), [GATE], m, NOW)
    assert v.stop is None and v.conditions == [] and v.events == []


def test_no_stop_without_a_plateau_spec_or_history() -> None:
    m = Metrics(4.05, None, 12.0, 2000, 1, 2000, 5.0)
    assert plateau.evaluate(None, stalled(), [GATE], m, NOW).stop is None
    assert plateau.evaluate(PlateauSpec(evaluations=1), None, [GATE], m, NOW).stop is None
