"""Early stopping (``spec.plateau``): stop a run whose validation loss no longer improves.

Every evaluation the trainer reports (a new ``progress.evaluatedStep`` with a validation loss)
is counted in ``status.evaluations``; the step-0 baseline is the first best. An evaluation
whose loss is lower than the best so far by more than ``minImprovement`` (relative) is the new
best; otherwise ``sinceBest`` grows. When ``sinceBest`` reaches ``evaluations`` the run is
checkpointed and stopped (phase ``Stopped``, reason ``Plateau``) and its decision is the final
gate's — every gate's thresholds applied to the metrics it stopped with — as at completion.
"""

from __future__ import annotations

from datetime import datetime

from fermata_api import EvaluationHistory, GateSpec, Phase, PlateauSpec, TrainerProgress
from fermata_operator.policies import gates
from fermata_operator.policies.effects import Stop, Verdict


def track(
    history: EvaluationHistory | None, progress: TrainerProgress | None, min_improvement: float = 0.0
) -> EvaluationHistory | None:
    """The history with the latest report's evaluation counted (once per evaluated step)."""
    if progress is None or progress.evaluated_step is None or progress.validation_loss is None:
        return history
    h = history or EvaluationHistory()
    if h.last_step is not None and progress.evaluated_step <= h.last_step:
        return h
    loss = progress.validation_loss
    improved = h.best_validation_loss is None or loss < h.best_validation_loss * (1.0 - min_improvement)
    update: dict[str, object] = {"count": h.count + 1, "last_step": progress.evaluated_step}
    if improved:
        update |= {"best_validation_loss": loss, "best_step": progress.evaluated_step, "since_best": 0}
    else:
        update["since_best"] = h.since_best + 1
    return h.model_copy(update=update)


def evaluate(
    spec: PlateauSpec | None,
    history: EvaluationHistory | None,
    gate_specs: list[GateSpec],
    m: gates.Metrics,
    now: datetime,
) -> Verdict:
    v = Verdict()
    if spec is None or history is None or history.since_best < spec.evaluations:
        return v
    outcome = gates.final(gate_specs, m, now)
    message = (
        f"validation loss has not improved for {history.since_best} evaluations "
        f"(best {history.best_validation_loss:.4f} at step {history.best_step}; "
        f"plateau.evaluations={spec.evaluations}); final: {outcome.reason}"
    )
    v.stop = Stop(Phase.stopped, "Plateau", message, outcome.decision)
    return v
