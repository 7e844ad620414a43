"""Go/no-go gates: milestones, per-metric judgement, the baseline-relative threshold, waiting for
an evaluation at or after the milestone, and the final decision."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from fermata_api import (
    Decision,
    EvaluationRequest,
    GateOutcome,
    GateRequire,
    GateSpec,
    PendingGate,
    Phase,
    TrainerProgress,
    TrainerState,
)
from fermata_api import conditions as cond
from fermata_operator.policies import gates
from fermata_operator.policies.effects import Event, SetCondition, Stop
from fermata_operator.policies.gates import Metrics
from tests.operator.factories import T0

NOW = T0 + timedelta(hours=10)
STARTED = NOW - timedelta(hours=10)


def gate(name: str = "g1", *, on_no_go: str = "stop", margin: float = 0.05, **kw: Any) -> GateSpec:
    at = {k: kw.pop(k) for k in ("elapsed", "step", "epoch") if k in kw}
    return GateSpec.model_validate(
        {"name": name, "at": at or {"step": 100}, "require": kw, "margin": margin, "onNoGo": on_no_go}
    )


def metrics(
    loss: float | None = None,
    auth: float | None = None,
    cost: float = 1.0,
    step: int = 0,
    epoch: int = 0,
    evaluated: int | None = None,
    baseline: float | None = None,
) -> Metrics:
    return Metrics(loss, auth, cost, step, epoch, evaluated, baseline)


# ----------------------------------------------------------------------------- when


def test_metrics_of_progress() -> None:
    p = TrainerProgress(
        state=TrainerState.training,
        heartbeat_time=NOW,
        step=120,
        epoch=2,
        validation_loss=4.1,
        authenticity=0.7,
        evaluated_step=100,
        baseline_validation_loss=5.0,
    )
    assert Metrics.of(p, 3.5) == Metrics(4.1, 0.7, 3.5, 120, 2, 100, 5.0)
    assert Metrics.of(None, 3.5) == Metrics(None, None, 3.5, 0, 0)


def test_milestone_elapsed() -> None:
    g = gate(elapsed="10h", maxCostUSD=5)
    m = metrics()
    assert gates.milestone_reached(g, STARTED, m, NOW)
    assert not gates.milestone_reached(g, STARTED, m, NOW - timedelta(seconds=1))
    assert not gates.milestone_reached(g, None, m, NOW)
    assert gates.seconds_until_milestone(g, STARTED, NOW - timedelta(hours=1)) == 3600.0
    assert gates.seconds_until_milestone(g, STARTED, NOW + timedelta(hours=1)) == 0.0
    assert gates.seconds_until_milestone(g, None, NOW) is None
    assert gates.seconds_until_milestone(gate(step=5, maxCostUSD=5), STARTED, NOW) is None


def test_milestone_step_and_epoch() -> None:
    by_step = gate(step=100, maxCostUSD=5)
    assert not gates.milestone_reached(by_step, STARTED, metrics(step=99), NOW)
    assert gates.milestone_reached(by_step, STARTED, metrics(step=100), NOW)
    by_epoch = gate(epoch=3, maxCostUSD=5)
    assert not gates.milestone_reached(by_epoch, STARTED, metrics(step=10_000, epoch=2), NOW)
    assert gates.milestone_reached(by_epoch, STARTED, metrics(epoch=3), NOW)


# ----------------------------------------------------------------------------- how


@pytest.mark.parametrize(
    ("loss", "expected"),
    [(4.0, Decision.go), (5.0, Decision.go), (5.2, Decision.conditional_go), (5.3, Decision.no_go)],
)
def test_judge_max_validation_loss(loss: float, expected: Decision) -> None:
    g = gate(maxValidationLoss=5.0)
    o = gates.judge(g.name, g.require, g.margin, metrics(loss=loss, step=100, evaluated=100), NOW)
    assert o.decision is expected
    assert o.evidence["maxValidationLoss"] == 5.0 and o.evidence["validationLoss"] == loss
    assert o.evaluated_step == 100


@pytest.mark.parametrize(
    ("auth", "expected", "reason"),
    [
        (0.8, Decision.go, "all thresholds met"),
        (0.6, Decision.go, "all thresholds met"),
        (0.575, Decision.conditional_go, "within margin: authenticity"),
        (0.5, Decision.no_go, "authenticity misses its threshold"),
        (None, Decision.no_go, "authenticity not reported"),
    ],
)
def test_judge_min_authenticity(auth: float | None, expected: Decision, reason: str) -> None:
    g = gate(minAuthenticity=0.6)
    o = gates.judge(g.name, g.require, g.margin, metrics(auth=auth), NOW)
    assert (o.decision, o.reason) == (expected, reason)
    assert o.evidence["minAuthenticity"] == 0.6
    assert ("authenticity" in o.evidence) is (auth is not None)


def test_judge_cost() -> None:
    req = GateRequire(max_cost_usd=100.0)
    assert gates.judge("c", req, 0.1, metrics(cost=100.0), NOW).decision is Decision.go
    assert gates.judge("c", req, 0.1, metrics(cost=110.0), NOW).decision is Decision.conditional_go
    o = gates.judge("c", req, 0.1, metrics(cost=110.5), NOW)
    assert o.decision is Decision.no_go and o.reason == "costUSD misses its threshold"
    assert o.evidence == {"costUSD": 110.5, "step": 0.0, "maxCostUSD": 100.0}
    assert o.evaluated_step is None  # cost needs no evaluation


def test_judge_combines_metrics() -> None:
    req = GateRequire(max_validation_loss=5.0, min_authenticity=0.6, max_cost_usd=10.0)
    o = gates.judge("g", req, 0.05, metrics(loss=5.1, auth=0.59, cost=2.0), NOW)
    assert o.decision is Decision.conditional_go
    assert o.reason == "within margin: authenticity, validationLoss"
    o = gates.judge("g", req, 0.05, metrics(loss=9.0, auth=None, cost=2.0), NOW)
    assert o.decision is Decision.no_go
    assert o.reason == "authenticity not reported; validationLoss misses its threshold"


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (4.5, Decision.go),  # exactly baseline × (1 − 0.1)
        (4.0, Decision.go),
        (4.7, Decision.conditional_go),  # ≤ 4.5 × 1.05 = 4.725
        (4.8, Decision.no_go),
        (5.0, Decision.no_go),
    ],
)
def test_min_improvement_over_baseline(loss: float, expected: Decision) -> None:
    req = GateRequire(min_improvement_over_baseline=0.1)
    o = gates.judge("rel", req, 0.05, metrics(loss=loss, evaluated=500, baseline=5.0), NOW)
    assert o.decision is expected
    assert o.evidence["minImprovementOverBaseline"] == 0.1
    assert o.evidence["baselineValidationLoss"] == 5.0
    assert o.evidence["improvementOverBaseline"] == pytest.approx(1 - loss / 5.0)
    assert o.evaluated_step == 500


def test_min_improvement_is_relative_to_the_baseline_not_absolute() -> None:
    req = GateRequire(min_improvement_over_baseline=0.05)
    # 2.0 → 1.95 is 2.5% better: not enough, though 0.05 lower in absolute terms.
    o = gates.judge("rel", req, 0.0, metrics(loss=1.95, baseline=2.0), NOW)
    assert o.decision is Decision.no_go
    assert o.evidence["improvementOverBaseline"] == pytest.approx(0.025)
    assert gates.judge("rel", req, 0.0, metrics(loss=1.8, baseline=2.0), NOW).decision is Decision.go


@pytest.mark.parametrize(("loss", "baseline"), [(4.0, None), (None, 5.0)])
def test_min_improvement_missing_baseline_or_loss(loss: float | None, baseline: float | None) -> None:
    req = GateRequire(min_improvement_over_baseline=0.1)
    o = gates.judge("rel", req, 0.05, metrics(loss=loss, baseline=baseline), NOW)
    assert o.decision is Decision.no_go
    assert o.reason == "improvementOverBaseline not reported"
    assert "improvementOverBaseline" not in o.evidence


def test_decision_label() -> None:
    assert gates.decision_label(Decision.go) == "Go"
    assert gates.decision_label(Decision.no_go) == "NoGo"
    assert gates.decision_label(Decision.conditional_go) == "ConditionalGo"


# ----------------------------------------------------------------------------- evaluate()


def evaluate(
    gs: list[GateSpec],
    m: Metrics,
    pending: list[PendingGate] | None = None,
    fired: set[str] | None = None,
    previous: EvaluationRequest | None = None,
    now: datetime = NOW,
) -> gates.GateResult:
    return gates.evaluate(gs, fired or set(), pending or [], m, STARTED, now, previous)


def test_step_gate_waits_for_an_evaluation_at_its_step_not_the_baseline() -> None:
    g = gate(step=100, maxValidationLoss=5.0)
    m = metrics(loss=4.0, step=120, evaluated=0, baseline=6.0)  # newest evaluation: the baseline
    r = evaluate([g], m)
    assert r.judged == []
    assert r.verdict.stop is None and r.verdict.conditions == [] and r.verdict.events == []
    assert r.pending == [PendingGate(name="g1", due_step=100, since=NOW)]
    assert r.request == EvaluationRequest(id="gate-g1-100", min_step=100, time=NOW)

    later = NOW + timedelta(minutes=5)
    again = evaluate([g], metrics(loss=4.0, step=130, evaluated=0), r.pending, previous=r.request, now=later)
    assert again.judged == []
    assert again.pending == r.pending  # the milestone time is kept
    assert again.request is r.request  # the same request: the trainer need not see a new id

    m = metrics(loss=4.2, step=140, evaluated=100)
    done = evaluate([g], m, again.pending, previous=again.request, now=later)
    (o,) = done.judged
    assert o.name == "g1" and o.decision is Decision.go and o.evaluated_step == 100
    assert done.pending == [] and done.request is None
    msg = "gate g1: all thresholds met (evaluation at step 100)"
    assert done.verdict.conditions == [SetCondition(cond.GATE_PASSED, True, "Go", msg)]
    assert done.verdict.events == [Event("Normal", "GateGo", msg)]


def test_step_gate_with_an_evaluation_already_past_fires_at_once() -> None:
    r = evaluate([gate(step=100, maxValidationLoss=5.0)], metrics(loss=4.0, step=250, evaluated=200))
    assert [o.evaluated_step for o in r.judged] == [200]
    assert r.pending == [] and r.request is None


def test_elapsed_gate_waits_for_the_step_it_was_reached_at() -> None:
    g = gate(elapsed="10h", maxValidationLoss=5.0)
    r = evaluate([g], metrics(loss=4.0, step=777, evaluated=500))
    assert r.pending == [PendingGate(name="g1", due_step=777, since=NOW)]
    assert r.request is not None and r.request.min_step == 777 and r.request.id == "gate-g1-777"


def test_elapsed_gate_before_its_time_wakes_at_it() -> None:
    g = gate(elapsed="11h", maxValidationLoss=5.0)
    r = evaluate([g], metrics(loss=4.0, step=777, evaluated=500))
    assert r.pending == [] and r.judged == [] and r.request is None
    assert r.verdict.wake_in == 3600.0


def test_epoch_gate_due_at_the_current_step() -> None:
    r = evaluate([gate(epoch=2, maxValidationLoss=5.0)], metrics(step=4000, epoch=2, evaluated=3500))
    assert r.pending[0].due_step == 4000


def test_cost_only_gate_fires_without_waiting() -> None:
    r = evaluate([gate(step=100, maxCostUSD=50.0)], metrics(cost=20.0, step=100, evaluated=0))
    (o,) = r.judged
    assert o.decision is Decision.go and o.evaluated_step is None
    assert r.pending == [] and r.request is None
    assert r.verdict.events == [Event("Normal", "GateGo", "gate g1: all thresholds met")]


def test_no_go_with_stop() -> None:
    g = gate(step=100, maxValidationLoss=5.0)
    r = evaluate([g], metrics(loss=6.0, step=100, evaluated=100))
    msg = "gate g1: validationLoss misses its threshold (evaluation at step 100)"
    assert r.verdict.stop == Stop(Phase.stopped, "GateNoGo", msg, Decision.no_go)
    assert r.verdict.conditions == [SetCondition(cond.GATE_PASSED, False, "NoGo", msg)]
    assert r.verdict.events == [Event("Warning", "GateNoGo", msg)]
    assert r.judged[0].decision is Decision.no_go


def test_no_go_with_continue_records_only() -> None:
    g = gate(step=100, maxValidationLoss=5.0, on_no_go="continue")
    r = evaluate([g], metrics(loss=6.0, step=100, evaluated=100))
    assert r.verdict.stop is None
    assert r.judged[0].decision is Decision.no_go
    assert r.verdict.conditions[0].status is False


def test_conditional_go_passes_the_condition() -> None:
    r = evaluate([gate(step=100, maxValidationLoss=5.0)], metrics(loss=5.1, step=100, evaluated=100))
    assert r.verdict.stop is None
    c = r.verdict.conditions[0]
    assert (c.status, c.reason) == (True, "ConditionalGo")
    assert r.verdict.events[0].reason == "GateConditionalGo"


def test_fired_gates_are_skipped_and_a_stop_ends_the_pass() -> None:
    a = gate("a", step=100, maxValidationLoss=5.0)
    b = gate("b", step=100, maxValidationLoss=1.0)
    c = gate("c", step=100, maxValidationLoss=9.0)
    m = metrics(loss=4.0, step=100, evaluated=100)
    r = evaluate([a, b, c], m, fired={"a"})
    assert [o.name for o in r.judged] == ["b"]  # a fired before; c not judged after b's stop
    assert r.verdict.stop is not None and r.request is None


def test_request_covers_every_waiting_gate() -> None:
    a = gate("a", step=100, maxValidationLoss=5.0)
    b = gate("b", step=300, maxValidationLoss=5.0)
    r = evaluate([a, b], metrics(loss=4.0, step=300, evaluated=0))
    assert [p.name for p in r.pending] == ["a", "b"]
    assert r.request is not None and r.request.id == "gate-a-b-100" and r.request.min_step == 100
    r2 = evaluate([a, b], metrics(loss=4.0, step=300, evaluated=150), r.pending, previous=r.request)
    assert [o.name for o in r2.judged] == ["a"]
    assert r2.request is not None and r2.request.id == "gate-b-300" and r2.request is not r.request


def test_pending_gate_removed_from_the_spec_is_dropped() -> None:
    stale = PendingGate(name="gone", due_step=100, since=NOW)
    r = evaluate([], metrics(step=200, evaluated=0), [stale])
    assert r.pending == []
    assert r.request is None


# ----------------------------------------------------------------------------- final()


def test_final_without_gates_is_go() -> None:
    o = gates.final([], metrics(cost=12.34567, step=900), NOW)
    assert o.name == gates.FINAL_GATE == "final"
    assert o.decision is Decision.go
    assert o.reason == "completed; no gates defined"
    assert o.evidence == {"costUSD": 12.3457, "step": 900.0}


def test_final_applies_every_gate() -> None:
    a = gate("a", step=100, maxValidationLoss=5.0)
    b = gate("b", step=200, minAuthenticity=0.6)
    m = metrics(loss=4.0, auth=0.58, step=1000, evaluated=1000)
    o = gates.final([a, b], m, NOW)
    assert o.decision is Decision.conditional_go
    assert o.reason == "a: all thresholds met; b: within margin: authenticity"
    assert o.evidence["maxValidationLoss"] == 5.0 and o.evidence["minAuthenticity"] == 0.6
    assert o.evaluated_step == 1000
    bad = gates.final([a, b], metrics(loss=9.0, auth=0.9), NOW)
    assert bad.decision is Decision.no_go


def test_combine() -> None:
    def o(d: Decision) -> GateOutcome:
        return GateOutcome(name="x", decision=d, time=NOW)

    assert gates.combine([]) is Decision.go
    assert gates.combine([o(Decision.go), o(Decision.conditional_go)]) is Decision.conditional_go
    assert gates.combine([o(Decision.conditional_go), o(Decision.no_go), o(Decision.go)]) is Decision.no_go
