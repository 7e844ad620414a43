"""Go/no-go gates: at a milestone, compare the run's metrics with thresholds.

Each metric is judged on its own:

* it meets its threshold → pass;
* it misses by at most ``margin`` (relative: loss ≤ max·(1+m), authenticity ≥ min·(1−m),
  cost ≤ max·(1+m)) → marginal;
* it misses by more, or was never reported → fail.

The gate's decision: any fail → NO-GO; else any marginal → CONDITIONAL-GO (continue,
flagged); else GO. The final decision at completion applies every gate's thresholds to the
final metrics (a run without gates is GO when it completes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fermata_operator.api import Decision, GateOutcome, GateRequire, GateSpec
from fermata_trainer.contract import TrainerProgress, parse_duration

FINAL_GATE = "final"


@dataclass(frozen=True)
class Metrics:
    validation_loss: float | None
    authenticity: float | None
    cost_usd: float
    step: int
    epoch: int

    @classmethod
    def of(cls, progress: TrainerProgress | None, cost_usd: float) -> Metrics:
        if progress is None:
            return cls(None, None, cost_usd, 0, 0)
        return cls(progress.validation_loss, progress.authenticity, cost_usd, progress.step, progress.epoch)


def due(gate: GateSpec, started: datetime | None, metrics: Metrics, now: datetime) -> bool:
    at = gate.at
    if at.elapsed is not None:
        return started is not None and (now - started).total_seconds() >= parse_duration(at.elapsed)
    if at.step is not None:
        return metrics.step >= at.step
    if at.epoch is not None:
        return metrics.epoch >= at.epoch
    return False


def seconds_until_due(gate: GateSpec, started: datetime | None, now: datetime) -> float | None:
    if gate.at.elapsed is None or started is None:
        return None
    return max(0.0, parse_duration(gate.at.elapsed) - (now - started).total_seconds())


def _judge_max(value: float | None, limit: float, margin: float) -> str:
    if value is None:
        return "missing"
    if value <= limit:
        return "pass"
    return "marginal" if value <= limit * (1 + margin) else "fail"


def _judge_min(value: float | None, limit: float, margin: float) -> str:
    if value is None:
        return "missing"
    if value >= limit:
        return "pass"
    return "marginal" if value >= limit * (1 - margin) else "fail"


def evaluate(name: str, require: GateRequire, margin: float, m: Metrics, now: datetime) -> GateOutcome:
    verdicts: dict[str, str] = {}
    evidence: dict[str, float] = {"costUSD": round(m.cost_usd, 4), "step": float(m.step)}
    if m.validation_loss is not None:
        evidence["validationLoss"] = m.validation_loss
    if m.authenticity is not None:
        evidence["authenticity"] = m.authenticity
    if require.max_validation_loss is not None:
        evidence["maxValidationLoss"] = require.max_validation_loss
        verdicts["validationLoss"] = _judge_max(m.validation_loss, require.max_validation_loss, margin)
    if require.min_authenticity is not None:
        evidence["minAuthenticity"] = require.min_authenticity
        verdicts["authenticity"] = _judge_min(m.authenticity, require.min_authenticity, margin)
    if require.max_cost_usd is not None:
        evidence["maxCostUSD"] = require.max_cost_usd
        verdicts["costUSD"] = _judge_max(m.cost_usd, require.max_cost_usd, margin)
    failing = sorted(k for k, v in verdicts.items() if v in {"fail", "missing"})
    marginal = sorted(k for k, v in verdicts.items() if v == "marginal")
    if failing:
        decision = Decision.no_go
        reason = "; ".join(
            f"{k} {'not reported' if verdicts[k] == 'missing' else 'misses its threshold'}" for k in failing
        )
    elif marginal:
        decision = Decision.conditional_go
        reason = "within margin: " + ", ".join(marginal)
    else:
        decision = Decision.go
        reason = "all thresholds met"
    return GateOutcome(name=name, decision=decision, time=now, reason=reason, evidence=evidence)


def combine(outcomes: list[GateOutcome]) -> Decision:
    decisions = {o.decision for o in outcomes}
    if Decision.no_go in decisions:
        return Decision.no_go
    if Decision.conditional_go in decisions:
        return Decision.conditional_go
    return Decision.go


def final(gates: list[GateSpec], m: Metrics, now: datetime) -> GateOutcome:
    """The decision at completion: every gate's thresholds against the final metrics."""
    if not gates:
        return GateOutcome(
            name=FINAL_GATE,
            decision=Decision.go,
            time=now,
            reason="completed; no gates defined",
            evidence={"costUSD": round(m.cost_usd, 4), "step": float(m.step)},
        )
    parts = [evaluate(g.name, g.require, g.margin, m, now) for g in gates]
    decision = combine(parts)
    evidence: dict[str, float] = {}
    for p in parts:
        evidence.update(p.evidence)
    reason = "; ".join(f"{p.name}: {p.reason}" for p in parts)
    return GateOutcome(name=FINAL_GATE, decision=decision, time=now, reason=reason, evidence=evidence)
