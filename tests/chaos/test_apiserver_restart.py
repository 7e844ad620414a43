"""The API server restarts (etcd data kept) under a running operator: it reconnects, the runs'
status is intact (same pods, incarnations, counters, billed spans), nothing is duplicated, and it
keeps acting — a run created after the restart gets its pod, and an interruption is handled."""

from __future__ import annotations

from typing import Any

import pytest

from fermata_dev.cluster import LocalControlPlane
from fermata_dev.kubelet import LocalKubelet
from tests.chaos.conftest import PodLedger, check_cost_segments
from tests.e2e.conftest import OperatorProcess, Runs, spec, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]

KEPT = ("phase", "incarnation", "interruptions", "failures", "capacity", "startTime")


def test_apiserver_restart_keeps_status_and_the_operator_keeps_acting(
    runs: Runs,
    operator: OperatorProcess,
    kubelet: LocalKubelet,
    spot_nodes: Any,
    ledger: PodLedger,
    control_plane: LocalControlPlane,
) -> None:
    spot_nodes(4)
    names = ["before-a", "before-b", "before-c"]
    for name in names:
        runs.create(name, spec(spot={"backoffSeconds": 0, "maxBackoffSeconds": 0}))
    for name in names:
        wait_for(lambda name=name: runs.status(name).get("phase") == "Running", timeout=60, what=name)
    before = {n: runs.status(n) for n in names}

    control_plane.restart_apiserver(downtime=2.0)

    # The operator process survives the outage and reconnects its watches.
    assert operator.proc is not None and operator.proc.poll() is None, operator.log()[-3000:]
    runs.create("after", spec())
    wait_for(lambda: runs.status("after").get("phase") == "Running", timeout=90, what="a run created after")
    # It still reacts to what happens to the old runs: an interruption gets a new pod.
    runs.core.delete_namespaced_pod("before-a-0", runs.ns)
    wait_for(
        lambda: [p.name for p in ledger.live("before-a")] == ["before-a-1"]
        and runs.status("before-a").get("phase") == "Running",
        timeout=60,
        what="before-a replaced after the restart",
    )
    for name in names:
        st = runs.status(name)
        changed = {k: (before[name].get(k), st.get(k)) for k in KEPT if before[name].get(k) != st.get(k)}
        if name == "before-a":
            assert changed.pop("incarnation") == (0, 1) and changed.pop("interruptions") == (0, 1)
        assert not changed, (name, changed)
        assert st["pod"]["name"] == f"{name}-{st['incarnation']}"
        old_segments = [s["pod"] for s in (before[name].get("cost") or {}).get("segments") or []]
        new_segments = [s["pod"] for s in (st.get("cost") or {}).get("segments") or []]
        assert new_segments[: len(old_segments)] == old_segments, (old_segments, new_segments)
        wait_for(
            lambda name=name: not check_cost_segments(runs.status(name), ledger.of_run(name)), timeout=30
        )
        assert [p.name for p in ledger.live(name)] == [st["pod"]["name"]]
    assert not ledger.violations, ledger.violations
    assert "Traceback" not in operator.log(), operator.log()[-5000:]
