"""Chaos tests: the operator, the API server, the trainer and S3 broken on purpose.

Shared pieces: the e2e fixtures (CRD, operator process, run helpers), a seeded random source
(``FERMATA_CHAOS_SEED``, printed on failure), a ledger that follows every trainer pod through a
watch — its real start and finish, and whether a run ever had two live pods at once — and extra
fake GPU nodes.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_dev.kubelet import SPOT_TAINT, LocalKubelet, NodeSpec
from tests.e2e.conftest import (  # noqa: F401  (fixtures)
    crd,
    operator,
    operator_factory,
    restricted_namespace,
    runs,
)

DEFAULT_SEED = 20261121


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault injection against the real control plane")


@pytest.fixture
def chaos_rng(request: pytest.FixtureRequest) -> random.Random:
    """A seeded random source; ``FERMATA_CHAOS_SEED=N`` replays a failure."""
    seed = int(os.environ.get("FERMATA_CHAOS_SEED", DEFAULT_SEED))
    request.node.user_properties.append(("chaos_seed", seed))
    print(f"chaos seed: {seed} (FERMATA_CHAOS_SEED)")
    return random.Random(seed)


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


# -- the pod ledger --------------------------------------------------------------------------------


@dataclass
class PodFacts:
    """What the API said about one trainer pod over its life (last values seen)."""

    name: str
    run: str
    uid: str
    start: datetime | None = None
    finished: datetime | None = None
    deleting: datetime | None = None
    phase: str | None = None
    gone: bool = False
    events: int = 0

    @property
    def live(self) -> bool:
        return not self.gone and self.deleting is None and self.phase not in ("Succeeded", "Failed")


@dataclass
class PodLedger:
    """Follows the namespace's trainer pods through a watch.

    After every event it checks that no run has two live pods (not terminating, not ended) —
    the "duplicate pod" invariant — and records a violation with the time it was seen.
    """

    api: Any
    namespace: str
    pods: dict[str, PodFacts] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pod-ledger")
        self._thread.start()
        assert self._ready.wait(30), "pod ledger watch did not start"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        core = client.CoreV1Api(self.api)
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = json.loads(
                        core.list_namespaced_pod(
                            self.namespace, label_selector="fermata.dev/run", _preload_content=False
                        ).data
                    )
                    items = listing.get("items") or []
                    for pod in items:
                        self._observe("ADDED", pod)
                    # A relist after a broken watch: pods deleted meanwhile are gone.
                    listed = {(p.get("metadata") or {}).get("uid") for p in items}
                    with self.lock:
                        for facts in self.pods.values():
                            if facts.uid not in listed:
                                facts.gone = True
                    rv = listing["metadata"]["resourceVersion"]
                    self._ready.set()
                resp = core.list_namespaced_pod(
                    self.namespace,
                    label_selector="fermata.dev/run",
                    resource_version=rv,
                    watch=True,
                    allow_watch_bookmarks=True,
                    timeout_seconds=30,
                    _preload_content=False,
                    _request_timeout=(5, 60),
                )
                pending = b""
                for chunk in resp.stream(65536, decode_content=True):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            raise ApiException(status=410, reason="relist")
                        obj = event.get("object") or {}
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            self._observe(str(event["type"]), obj)
                    if self._stop.is_set():
                        break
                resp.release_conn()
            except ApiException:
                rv = None
                time.sleep(0.2)
            except Exception:  # the API server restarting, a connection reset: resume the watch
                time.sleep(0.2)

    def _observe(self, kind: str, pod: dict[str, Any]) -> None:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        name = meta.get("name", "?")
        run = (meta.get("labels") or {}).get("fermata.dev/run", "?")
        with self.lock:
            facts = self.pods.get(name)
            if facts is None or facts.uid != meta.get("uid"):
                facts = self.pods[name] = PodFacts(name=name, run=run, uid=str(meta.get("uid")))
            facts.events += 1
            facts.phase = status.get("phase")
            facts.start = ts(status.get("startTime")) or facts.start
            facts.deleting = ts(meta.get("deletionTimestamp")) or facts.deleting
            for cs in status.get("containerStatuses") or []:
                finished = ((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")
                if finished:
                    facts.finished = ts(finished)
            if kind == "DELETED":
                facts.gone = True
            live = sorted(p.name for p in self.pods.values() if p.run == run and p.live)
            if len(live) > 1:
                self.violations.append(f"{time.strftime('%H:%M:%S')} run {run}: live pods {live}")

    def of_run(self, run: str) -> list[PodFacts]:
        with self.lock:
            return sorted((p for p in self.pods.values() if p.run == run), key=lambda p: p.name)

    def live(self, run: str) -> list[PodFacts]:
        return [p for p in self.of_run(run) if p.live]


@pytest.fixture
def ledger(k8s_api: Any, restricted_namespace: str) -> Iterator[PodLedger]:  # noqa: F811
    book = PodLedger(k8s_api, restricted_namespace)
    book.start()
    yield book
    book.stop()


def check_cost_segments(run_status: dict[str, Any], pods: list[PodFacts]) -> list[str]:
    """Differences between a run's billed spans and its pods' real lives (empty: they agree).

    Every pod that started has exactly one segment, from its ``startTime``; an ended pod's
    segment is closed at its container's ``finishedAt`` (or, without one, at its deletion); a
    pod that never started has none. Timestamps compare exactly (the API's second precision).
    """
    problems: list[str] = []
    segments = (run_status.get("cost") or {}).get("segments") or []
    names = [s["pod"] for s in segments]
    if len(names) != len(set(names)):
        problems.append(f"duplicate segments: {names}")
    by_pod = {s["pod"]: s for s in segments}
    for pod in pods:
        seg = by_pod.pop(pod.name, None)
        if pod.start is None:
            if seg is not None:
                problems.append(f"{pod.name} never started but was billed: {seg}")
            continue
        if seg is None:
            problems.append(f"{pod.name} started at {pod.start} but has no segment (lost cost)")
            continue
        if ts(seg["start"]) != pod.start:
            problems.append(f"{pod.name}: segment start {seg['start']} != pod startTime {pod.start}")
        ended = pod.finished or (pod.deleting if not pod.live else None)
        seg_end = ts(seg.get("end"))
        if pod.live:
            if seg_end is not None:
                problems.append(f"{pod.name} still runs but its segment is closed at {seg_end}")
        elif seg_end is None:
            problems.append(f"{pod.name} ended at {ended} but its segment is open")
        elif pod.finished is not None and seg_end != pod.finished:
            problems.append(f"{pod.name}: segment end {seg_end} != finishedAt {pod.finished}")
    for name in by_pod:
        problems.append(f"segment for unknown pod {name}")
    return problems


# -- extra nodes ---------------------------------------------------------------------------------


@pytest.fixture
def spot_nodes(kubelet: LocalKubelet) -> Iterator[Any]:
    """``spot_nodes(n)`` registers n more one-GPU g4dn.xlarge spot nodes (removed afterwards)."""
    added: list[str] = []

    def add(n: int) -> list[str]:
        for _ in range(n):
            name = f"chaos-{len(added):03d}"
            kubelet.add_node(NodeSpec(name, "g4dn.xlarge", "spot", "us-east-1c", taints=(SPOT_TAINT,)))
            added.append(name)
        return list(added)

    # The next test's kubelet fixture removes them (after this test's runs are drained).
    yield add
