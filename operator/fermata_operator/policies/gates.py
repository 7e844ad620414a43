"""Go/no-go gates: at a milestone, judge an evaluation taken at or after it.

**When.** A gate's milestone is an elapsed time, a step or an epoch. Once it is reached, the
gate *waits* (``status.pendingGates``) for an evaluation at or after its milestone step — the
gate's own step, or the step the run was at when its time or epoch came — and asks the trainer
for one (``status.control.evaluationRequest``) instead of judging an older evaluation (such as
the step-0 baseline). A gate that checks cost only needs no evaluation. The outcome records the
step it judged (``evaluatedStep``).

**How.** Each threshold is judged on its own:

* it is met → pass;
* it misses by at most ``margin`` (relative: loss ≤ max·(1+m), authenticity ≥ min·(1−m),
  cost ≤ max·(1+m)) → marginal;
* it misses by more, or the metric was never reported → fail.

``minImprovementOverBaseline: x`` is relative to the run's own baseline: the validation loss must
be at most ``baseline × (1 − x)``. The gate's decision: any fail → NO-GO (the run stops unless
``onNoGo: continue``); else any marginal → CONDITIONAL-GO; else GO. At completion the ``final``
gate applies every gate's thresholds to the final metrics (no gates: GO).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from fermata_api import (
    Decision,
    EvaluationRequest,
    GateOutcome,
    GateRequire,
    GateSpec,
    NoGoAction,
    PendingGate,
    Phase,
    TrainerProgress,
    parse_duration,
)
from fermata_api import conditions as cond
from fermata_operator.policies.effects import Stop, Verdict

FINAL_GATE = "final"


@dataclass(frozen=True)
class Metrics:
    validation_loss: float | None
    authenticity: float | None
    cost_usd: float
    step: int
    epoch: int
    evaluated_step: int | None = None
    baseline_validation_loss: float | None = None

    @classmethod
    def of(cls, progress: TrainerProgress | None, cost_usd: float) -> Metrics:
        if progress is None:
            return cls(None, None, cost_usd, 0, 0)
        return cls(
            progress.validation_loss,
            progress.authenticity,
            cost_usd,
            progress.step,
            progress.epoch,
            progress.evaluated_step,
            progress.baseline_validation_loss,
        )


# ----------------------------------------------------------------------------- when


def milestone_reached(gate: GateSpec, started: datetime | None, m: Metrics, now: datetime) -> bool:
    at = gate.at
    if at.elapsed is not None:
        return started is not None and (now - started).total_seconds() >= parse_duration(at.elapsed)
    if at.step is not None:
        return m.step >= at.step
    return at.epoch is not None and m.epoch >= at.epoch


def seconds_until_milestone(gate: GateSpec, started: datetime | None, now: datetime) -> float | None:
    if gate.at.elapsed is None or started is None:
        return None
    return max(0.0, parse_duration(gate.at.elapsed) - (now - started).total_seconds())


def needs_evaluation(require: GateRequire) -> bool:
    return any(
        x is not None
        for x in (
            require.max_validation_loss,
            require.min_authenticity,
            require.min_improvement_over_baseline,
        )
    )


# ----------------------------------------------------------------------------- how


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


def _relative(require: GateRequire, m: Metrics, margin: float, evidence: dict[str, float]) -> str:
    """The baseline-relative threshold: loss at most baseline × (1 − minImprovementOverBaseline)."""
    x = require.min_improvement_over_baseline
    assert x is not None
    evidence["minImprovementOverBaseline"] = x
    base = m.baseline_validation_loss
    if base is None or m.validation_loss is None:
        return "missing"
    evidence["baselineValidationLoss"] = base
    evidence["improvementOverBaseline"] = round(1.0 - m.validation_loss / base, 6)
    return _judge_max(m.validation_loss, base * (1.0 - x), margin)


def _verdicts(require: GateRequire, margin: float, m: Metrics, evidence: dict[str, float]) -> dict[str, str]:
    verdicts: dict[str, str] = {}
    if require.max_validation_loss is not None:
        evidence["maxValidationLoss"] = require.max_validation_loss
        verdicts["validationLoss"] = _judge_max(m.validation_loss, require.max_validation_loss, margin)
    if require.min_improvement_over_baseline is not None:
        verdicts["improvementOverBaseline"] = _relative(require, m, margin, evidence)
    if require.min_authenticity is not None:
        evidence["minAuthenticity"] = require.min_authenticity
        verdicts["authenticity"] = _judge_min(m.authenticity, require.min_authenticity, margin)
    if require.max_cost_usd is not None:
        evidence["maxCostUSD"] = require.max_cost_usd
        verdicts["costUSD"] = _judge_max(m.cost_usd, require.max_cost_usd, margin)
    return verdicts


def judge(name: str, require: GateRequire, margin: float, m: Metrics, now: datetime) -> GateOutcome:
    evidence: dict[str, float] = {"costUSD": round(m.cost_usd, 4), "step": float(m.step)}
    if m.validation_loss is not None:
        evidence["validationLoss"] = m.validation_loss
    if m.authenticity is not None:
        evidence["authenticity"] = m.authenticity
    verdicts = _verdicts(require, margin, m, evidence)
    failing = sorted(k for k, v in verdicts.items() if v in {"fail", "missing"})
    marginal = sorted(k for k, v in verdicts.items() if v == "marginal")
    if failing:
        decision = Decision.no_go
        reason = "; ".join(
            f"{k} {'not reported' if verdicts[k] == 'missing' else 'misses its threshold'}" for k in failing
        )
    elif marginal:
        decision, reason = Decision.conditional_go, "within margin: " + ", ".join(marginal)
    else:
        decision, reason = Decision.go, "all thresholds met"
    return GateOutcome(
        name=name,
        decision=decision,
        time=now,
        reason=reason,
        evidence=evidence,
        evaluated_step=m.evaluated_step if needs_evaluation(require) else None,
    )


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
    parts = [judge(g.name, g.require, g.margin, m, now) for g in gates]
    evidence: dict[str, float] = {}
    for p in parts:
        evidence.update(p.evidence)
    return GateOutcome(
        name=FINAL_GATE,
        decision=combine(parts),
        time=now,
        reason="; ".join(f"{p.name}: {p.reason}" for p in parts),
        evidence=evidence,
        evaluated_step=m.evaluated_step,
    )


# ----------------------------------------------------------------------------- the policy


@dataclass
class GateResult:
    verdict: Verdict
    #: Outcomes of the gates judged now (to append to status.gates).
    judged: list[GateOutcome] = field(default_factory=list)
    #: Gates still waiting for their evaluation.
    pending: list[PendingGate] = field(default_factory=list)
    #: The evaluation the waiting gates ask the trainer for (None: nothing to ask).
    request: EvaluationRequest | None = None


def decision_label(decision: Decision) -> str:
    """``GO`` → ``Go``, ``NO-GO`` → ``NoGo``, ``CONDITIONAL-GO`` → ``ConditionalGo``."""
    return decision.value.title().replace("-", "")


def _fire(gate: GateSpec, m: Metrics, now: datetime, v: Verdict) -> GateOutcome:
    outcome = judge(gate.name, gate.require, gate.margin, m, now)
    label = decision_label(outcome.decision)
    message = f"gate {gate.name}: {outcome.reason}"
    if outcome.evaluated_step is not None:
        message += f" (evaluation at step {outcome.evaluated_step})"
    v.condition(cond.GATE_PASSED, outcome.decision is not Decision.no_go, label, message)
    v.event("Warning" if outcome.decision is Decision.no_go else "Normal", "Gate" + label, message)
    if outcome.decision is Decision.no_go and gate.on_no_go is NoGoAction.stop:
        v.stop = Stop(Phase.stopped, "GateNoGo", message)
    return outcome


def evaluate(
    gates: list[GateSpec],
    fired: set[str],
    pending: list[PendingGate],
    m: Metrics,
    started: datetime | None,
    now: datetime,
    previous_request: EvaluationRequest | None,
) -> GateResult:
    """Advance every gate: reach milestones, judge those whose evaluation has come, ask for the rest."""
    v = Verdict()
    result = GateResult(verdict=v)
    names = {g.name for g in gates}
    waiting = {p.name: p for p in pending if p.name in names}  # a gate removed from the spec is dropped
    for gate in gates:
        if gate.name in fired:
            continue
        if gate.name not in waiting:
            if not milestone_reached(gate, started, m, now):
                v.wake(seconds_until_milestone(gate, started, now))
                continue
            due = gate.at.step if gate.at.step is not None else m.step
            waiting[gate.name] = PendingGate(name=gate.name, due_step=due, since=now)
        wait = waiting[gate.name]
        ready = not needs_evaluation(gate.require) or (
            m.evaluated_step is not None and m.evaluated_step >= wait.due_step
        )
        if ready:
            result.judged.append(_fire(gate, m, now, v))
            del waiting[gate.name]
            if v.stop is not None:
                break
    result.pending = list(waiting.values())
    if result.pending and v.stop is None:
        due = min(p.due_step for p in result.pending)
        rid = f"gate-{'-'.join(sorted(p.name for p in result.pending))}-{due}"
        keep = previous_request is not None and previous_request.id == rid
        result.request = previous_request if keep else EvaluationRequest(id=rid, min_step=due, time=now)
    return result
