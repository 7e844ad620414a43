"""GPU and cost scalars in the trainer's TensorBoard events: the real tiny model trains on the
CPU and reports to a stand-in for the operator's side of the status (as in
``test_evaluation_request.py``), whose replies carry ``status.cost`` from the third report on.
``cost/accrued_usd`` follows those replies; ``gpu/*`` are absent (no NVML on the CPU), not zeros."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fermata_api import TrainerState, TrainerStatus
from fermata_trainer.training_loop import Trainer
from tests.trainer.conftest import ConfigFactory

pytestmark = pytest.mark.trainer


class CostingOperator:
    """Answers every report with the run's status; the cost appears at the third reply and grows
    by one cent a reply (the operator computes it; the trainer only reads it)."""

    def __init__(self) -> None:
        self.replies = 0
        self.costs: list[float] = []

    def report(self, status: TrainerStatus) -> dict[str, Any] | None:
        self.replies += 1
        run: dict[str, Any] = {"status": {"progress": status.progress.wire()}}
        if self.replies >= 3:
            accrued = round(0.01 * self.replies, 2)
            self.costs.append(accrued)
            run["status"]["cost"] = {"accruedUSD": accrued, "updated": "2026-01-01T00:00:00Z"}
        return run

    def close(self) -> None:
        pass


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def test_cost_scalars_follow_the_status_replies_and_no_gpu_scalars_on_cpu(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    operator = CostingOperator()
    config = make_config(max_steps=6, heartbeat_seconds=1e-6)  # a report after every step
    outcome = Trainer(config, reporter=operator).run()
    assert outcome.state is TrainerState.completed and outcome.step == 6

    # Read from the storage mirror (<checkpoints>/tensorboard/), as kubectl fermata does.
    series = _scalars(tmp_path / "storage" / "tensorboard")
    assert [s for s, _ in series["train/loss"]] == list(range(1, 7))
    cost = series["cost/accrued_usd"]
    assert cost, "no cost scalar although the replies carried status.cost"
    # Every written value is one the API returned, in order, and the last one is the last seen.
    values = [round(v, 4) for _, v in cost]
    assert values == sorted(values) and set(values) <= set(operator.costs)
    assert values[-1] == operator.costs[-1]
    assert all(0 <= s <= 6 for s, _ in cost)
    assert not [tag for tag in series if tag.startswith("gpu/")], "GPU scalars on a CPU run"
