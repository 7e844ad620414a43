"""Application failures (non-zero exit, OOM): retried apart from spot interruptions.

A failure counts against ``failures.maxRetries`` only, with its own exponential backoff from
``failures.backoffSeconds`` (capped at an hour). Permanent configuration errors (the trainer's
exit code 2, a missing Secret, a bad image name) are not retried: they fail the run at once.
"""

from __future__ import annotations

from fermata_api import Phase, TrainingRunSpec
from fermata_api import conditions as cond
from fermata_operator.policies.effects import Stop, Verdict
from fermata_operator.policies.pod_outcome import Outcome
from fermata_operator.policies.spot import backoff_seconds

MAX_BACKOFF_SECONDS = 3600.0


def on_failure(spec: TrainingRunSpec, count: int, outcome: Outcome) -> tuple[Verdict, float]:
    """The ``count``-th failure (already counted): fail the run, or wait and retry."""
    v = Verdict().condition(cond.INTERRUPTED, False, "Failure", outcome.message)
    limit = spec.failures.max_retries
    if count > limit:
        v.condition(cond.FAILED, True, outcome.reason, outcome.message)
        v.stop = Stop(Phase.failed, "TrainerFailed", outcome.message)
        return v, 0.0
    delay = backoff_seconds(count, spec.failures.backoff_seconds, MAX_BACKOFF_SECONDS)
    v.event("Warning", "TrainerFailed", f"{outcome.message}; retry {count}/{limit} in {delay:.0f}s")
    return v, delay


def on_config_error(outcome: Outcome) -> Verdict:
    """A permanent configuration error: the run fails now, without retries."""
    v = Verdict().condition(cond.FAILED, True, outcome.reason, outcome.message)
    v.stop = Stop(Phase.failed, outcome.reason, outcome.message)
    return v
