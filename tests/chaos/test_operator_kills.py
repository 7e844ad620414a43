"""kill -9 the operator at random (seeded) points while 20 runs are created, interrupted,
suspended and resumed: afterwards no run ever had two live pods, every pod's real life is billed
exactly once (``status.cost.segments`` against the pods' ``startTime`` / ``finishedAt``), and every
interruption is counted exactly once."""

from __future__ import annotations

import heapq
import random
import time
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fermata_dev.kubelet import LocalKubelet
from tests.chaos.conftest import PodLedger, check_cost_segments
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]

RUNS = 20
KILLS = 8
INTERRUPTIONS = 12
SUSPENDS = 3
CHAOS_SECONDS = 22.0


def _spec() -> dict[str, Any]:
    return spec(
        spot={
            "backoffSeconds": 0,
            "maxBackoffSeconds": 0,
            "maxInterruptions": 100,
            "fallbackToOnDemandAfter": 0,
        },
        failures={"maxRetries": 0},
    )


def _timeline(rng: random.Random, names: list[str]) -> list[tuple[float, int, str, str]]:
    actions: list[tuple[float, int, str, str]] = []
    seq = iter(range(10_000))
    for name in names:
        actions.append((rng.uniform(0.0, 6.0), next(seq), "create", name))
    for _ in range(KILLS):
        actions.append((rng.uniform(0.5, CHAOS_SECONDS), next(seq), "kill", ""))
    # Suspended runs are not also interrupted: an interruption the operator only sees after
    # the run was suspended is absorbed by the suspend (not counted), which would make the
    # exact interruption count below depend on timing.
    paused = rng.sample(names, SUSPENDS)
    for name in paused:
        at = rng.uniform(6.0, CHAOS_SECONDS - 7.0)
        actions.append((at, next(seq), "suspend", name))
        actions.append((at + rng.uniform(2.0, 5.0), next(seq), "resume", name))
    others = [n for n in names if n not in paused]
    for _ in range(INTERRUPTIONS):
        actions.append((rng.uniform(5.0, CHAOS_SECONDS), next(seq), "interrupt", rng.choice(others)))
    heapq.heapify(actions)
    return actions


def test_kill_9_at_random_points_keeps_one_pod_per_run_and_exact_costs(
    runs: Runs,
    operator_factory: Any,
    kubelet: LocalKubelet,
    spot_nodes: Any,
    ledger: PodLedger,
    chaos_rng: random.Random,
) -> None:
    spot_nodes(RUNS + 4)
    op: OperatorProcess = operator_factory(runs.ns)
    names = [f"k{i:02d}" for i in range(RUNS)]
    actions = _timeline(chaos_rng, names)
    interrupted: dict[str, list[str]] = {n: [] for n in names}
    suspended: set[str] = set()
    kills = 0
    restart_at = 0.0
    log: list[str] = []
    start = time.monotonic()
    while actions:
        at, _, what, name = heapq.heappop(actions)
        time.sleep(max(0.0, start + at - time.monotonic()))
        log.append(f"{at:6.2f} {what} {name}")
        if what == "create":
            runs.create(name, _spec())
        elif what == "kill":
            if op.proc is not None and op.proc.poll() is None:
                op.kill()
                kills += 1
                restart_at = at + chaos_rng.uniform(0.0, 2.0)
                heapq.heappush(actions, (restart_at, 0, "restart", ""))
            else:  # already down: kill the next incarnation instead, at a random point of its life
                heapq.heappush(actions, (restart_at + chaos_rng.uniform(0.1, 3.0), 1, "kill", ""))
                log[-1] += " (operator down: postponed)"
        elif what == "restart":
            if op.proc is None or op.proc.poll() is not None:
                op.start()
        elif what == "interrupt":
            live = [p for p in ledger.live(name) if p.phase == "Running"]
            if name in suspended or not live:
                log[-1] += " (skipped: no running pod)"
                continue
            try:
                runs.core.delete_namespaced_pod(live[0].name, runs.ns)
                interrupted[name].append(live[0].name)
                log[-1] += f" {live[0].name}"
            except ApiException as exc:
                if exc.status != 404:
                    raise
        elif what == "suspend":
            suspended.add(name)
            runs.patch_spec(name, {"suspend": True})
        elif what == "resume":
            suspended.discard(name)
            runs.patch_spec(name, {"suspend": False})
    if op.proc is None or op.proc.poll() is not None:
        op.start()
    assert kills == KILLS, log

    def unsettled(name: str) -> str:
        """Why the run is not (yet) in its final state; empty when it is."""
        st = runs.status(name)
        live = ledger.live(name)
        pods = ledger.of_run(name)
        if st.get("phase") != "Running":
            return f"phase {st.get('phase')}: {st.get('message')}"
        if len(live) != 1 or live[0].phase != "Running":
            return f"live pods {[(p.name, p.phase) for p in live]}"
        if (st.get("pod") or {}).get("name") != live[0].name:
            return f"status.pod {(st.get('pod') or {}).get('name')} != live pod {live[0].name}"
        stuck = [p.name for p in pods if not p.live and not p.gone]
        if stuck:  # every ended pod is billed, then its finalizer released
            return f"ended pods not released: {stuck}"
        return "; ".join(check_cost_segments(st, pods))

    try:
        wait_for(
            lambda: not any(unsettled(n) for n in names), timeout=90, interval=1.0, what="all runs settled"
        )
    except AssertionError:
        why = {n: u for n in names if (u := unsettled(n))}
        raise AssertionError(
            f"runs not settled: {why}\n" + "\n".join(log) + "\n--- operator log tail:\n" + op.log()[-4000:]
        ) from None
    context = "\n".join(log) + "\n--- operator log tail:\n" + op.log()[-3000:]
    problems: list[str] = []
    for name in names:
        st = runs.status(name)
        pods = ledger.of_run(name)
        problems += [f"{name}: {p}" for p in check_cost_segments(st, pods)]
        if st.get("interruptions", 0) != len(interrupted[name]):
            problems.append(
                f"{name}: {st.get('interruptions')} interruptions counted, "
                f"{len(interrupted[name])} caused ({interrupted[name]})"
            )
        if st.get("failures", 0) != 0:
            problems.append(f"{name}: failures={st.get('failures')}: {st.get('message')}")
    segments = sum(len((runs.status(n).get("cost") or {}).get("segments") or []) for n in names)
    print(
        f"{kills} kills, {sum(len(v) for v in interrupted.values())} interruptions, {SUSPENDS} suspends, "
        f"{len(ledger.pods)} pods, {segments} billed segments checked"
    )
    assert not ledger.violations, ledger.violations
    assert not problems, "\n".join(problems) + "\n" + context
    assert "Traceback" not in op.log(), op.log()[-5000:]
    # The run really went through the chaos: pods were replaced and billed.
    assert sum(len(v) for v in interrupted.values()) >= INTERRUPTIONS // 2, context
