"""status.control.evaluationRequest: the operator asks for an evaluation at or after a step (a
gate whose milestone fell between two scheduled evaluations); the real tiny model trains on the
CPU and answers it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fermata_api import TrainerProgress, TrainerState, TrainerStatus
from fermata_trainer.training_loop import Trainer
from tests.trainer.conftest import ConfigFactory

pytestmark = pytest.mark.trainer

REQUEST_ID = "eval-gate-w1-1"


class OperatorDouble:
    """Plays the operator's side of the status: keeps every report and answers each with the
    run's status, whose control block carries the evaluation request from the step the gate's
    milestone is reached (``appear_at``) until it is taken back (``withdraw_at``)."""

    def __init__(self, min_step: int, appear_at: int = 0, withdraw_at: int | None = None) -> None:
        self.min_step = min_step
        self.appear_at = appear_at
        self.withdraw_at = withdraw_at
        self.progress: list[TrainerProgress] = []

    def report(self, status: TrainerStatus) -> dict[str, Any] | None:
        progress = status.progress.model_copy(deep=True)
        self.progress.append(progress)
        control: dict[str, Any] = {}
        step = progress.step
        if step >= self.appear_at and (self.withdraw_at is None or step < self.withdraw_at):
            control["evaluationRequest"] = {
                "id": REQUEST_ID,
                "minStep": self.min_step,
                "reason": "gate w1",
                "time": datetime.now(UTC).isoformat(),
            }
        return {"status": {"progress": progress.wire(), "control": control}}

    def close(self) -> None:
        pass

    def acked(self) -> list[TrainerProgress]:
        return [p for p in self.progress if p.evaluation_request_ack == REQUEST_ID]


def _run(make_config: ConfigFactory, double: OperatorDouble) -> Trainer:
    # Scheduled evaluations at 0 (baseline), 5 and 10, the final one at 12; a report every step.
    config = make_config(max_steps=12, evaluate_every=5, heartbeat_seconds=1e-6)
    trainer = Trainer(config, reporter=double)
    outcome = trainer.run()
    assert outcome.state is TrainerState.completed and outcome.step == 12
    return trainer


def _evaluated_steps(trainer: Trainer) -> list[int]:
    return [int(e["step"]) for e in trainer.history]


def test_a_request_between_scheduled_evaluations_is_evaluated_at_its_step_and_acked(
    make_config: ConfigFactory,
) -> None:
    double = OperatorDouble(min_step=7)
    trainer = _run(make_config, double)

    # One extra evaluation, at minStep: not earlier, and not again though the request stays.
    assert _evaluated_steps(trainer) == [0, 5, 7, 10, 12]
    acked = double.acked()
    assert acked, "the request was never acknowledged"
    first = acked[0]
    assert first.step == 7 and first.evaluated_step == 7
    assert first.validation_loss is not None
    assert all(p.evaluated_step is not None and p.evaluated_step >= 7 for p in acked)
    # Before the answer no report claims it; after it, every report does.
    index = double.progress.index(first)
    assert all(p.evaluation_request_ack is None for p in double.progress[:index])
    assert all(p.evaluation_request_ack == REQUEST_ID for p in double.progress[index:])
    assert trainer.evaluation_ack == REQUEST_ID and trainer.pending_evaluation is None


@pytest.mark.parametrize(
    ("min_step", "appear_at", "ack_step", "ack_evaluated_step"),
    [
        (10, 0, 10, 10),  # the scheduled evaluation at minStep answers it: no second one
        (0, 0, 0, 0),  # the baseline evaluation at step 0 answers it
        (3, 6, 6, 5),  # asked late: the evaluation at 5 is already at or after minStep 3
    ],
)
def test_an_existing_evaluation_at_or_after_min_step_is_only_acked(
    make_config: ConfigFactory, min_step: int, appear_at: int, ack_step: int, ack_evaluated_step: int
) -> None:
    double = OperatorDouble(min_step=min_step, appear_at=appear_at)
    trainer = _run(make_config, double)

    assert _evaluated_steps(trainer) == [0, 5, 10, 12]
    first = double.acked()[0]
    assert (first.step, first.evaluated_step) == (ack_step, ack_evaluated_step)
    assert first.evaluated_step is not None and first.evaluated_step >= min_step


def test_a_withdrawn_request_is_not_answered(make_config: ConfigFactory) -> None:
    double = OperatorDouble(min_step=7, withdraw_at=3)
    trainer = _run(make_config, double)

    assert _evaluated_steps(trainer) == [0, 5, 10, 12]
    assert double.acked() == []
    assert trainer.pending_evaluation is None
