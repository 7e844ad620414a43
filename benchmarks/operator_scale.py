"""How the operator scales: N TrainingRuns at once against a real API server with N fake GPU nodes.

For each N (default 100, 300, 1000) the benchmark starts a fresh local control plane (the real
kube-apiserver + etcd, controller-manager and scheduler of ``tests/cluster``, with an audit log),
registers N + spare one-GPU ``g4dn.xlarge`` spot nodes played by a node simulator, starts the
operator as its own process (cluster-wide, ``python -m fermata_operator``), creates N runs as fast
as a few client threads can, and measures:

* **all pods**: seconds from the first create to the moment every run has its pod, and each
  run's create → pod latency (p50/p95/max; "create" is when the request was sent, "pod" is when
  a watch on the pods saw it ADDED);
* **all running**: seconds until every pod is Running and every run's phase is Running;
* **operator CPU seconds and peak RSS**, from ``/proc/<pid>/stat`` and ``VmHWM`` of the
  operator process (start-up excluded from the burst figure);
* **steady-state API traffic**: the operator's requests (user agents ``fermata-operator/*`` and
  ``kopf/*``, counted in the API server's audit log) per run per minute over a window after all
  runs are Running and settled, and the operator's CPU share over it;
* **interruption reaction**: a run's pod is deleted (``spot.backoffSeconds: 0``) → seconds until
  the replacement pod exists, for a few runs one after another, under the full load;
* **budget overshoot**: probe runs with a tiny budget at a high price (``spec.budget.prices``)
  → seconds from the budget crossing (pod ``startTime`` + maxUSD / rate, the operator's own
  accounting) to the pod's deletion being seen, and the billed spend past the budget in seconds.

Nodes are played by the Python test kubelet (:mod:`fermata_dev.kubelet`), one process
per ``--nodes-per-kubelet`` nodes, in ``auto`` mode (a bound pod goes Running at once), posting
node status every ``--node-status-seconds`` (like a kubelet's ``nodeStatusReportFrequency``; no
node lifecycle controller runs, so nodes stay Ready). It carries N = 1000 with ~15 CPU seconds
for the whole run, so kwok is not needed at this scale (see BENCHMARKS.md).

Run (about 4 + 5 + 9 minutes on 2 cores)::

    .venv/bin/python benchmarks/operator_scale.py                       # N = 100, 300, 1000
    .venv/bin/python benchmarks/operator_scale.py --runs 100 --window 60 --json out.json

Every phase has a time limit; the benchmark prints what it measured and exits non-zero when a
phase timed out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "trainer"))
sys.path.insert(0, str(ROOT / "dev"))

from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from fermata_api import contract  # noqa: E402
from fermata_dev.cluster import LocalControlPlane, ensure_built  # noqa: E402
from fermata_operator.crdgen import render  # noqa: E402

GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL
NAMESPACE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
OPERATOR_AGENTS = ("fermata-operator/", "kopf/")
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [{"level": "Metadata"}],
}


class PhaseTimeout(RuntimeError):
    pass


# ----------------------------------------------------------------------------- helpers


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise PhaseTimeout(f"timed out after {timeout:.0f}s: {what}")
        time.sleep(interval)
    return time.monotonic() - start


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def machine_busy_cores() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def proc_peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_spec(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"uri": "s3://datasets/magnatagatune/"},
        "resources": {
            "image": "ghcr.io/fermata-dev/fermata-trainer:bench",
            "cpu": "500m",
            "memory": "1Gi",
            "instanceTypes": ["g4dn.xlarge"],
        },
        "budget": {"maxUSD": 600},
        "storage": {"checkpoints": "s3://ml-runs/bench/"},
        "spot": {"backoffSeconds": 0},
        "idle": {"timeout": "2h", "minGpuUtilization": 0},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


# ----------------------------------------------------------------------------- pod watcher


@dataclass
class PodSeen:
    added: float | None = None
    running: float | None = None
    deleting: float | None = None
    start_time: str | None = None


class PodWatcher:
    """Follows the namespace's trainer pods; records when each was first seen, Running, deleting."""

    def __init__(self, api: Any) -> None:
        self.core = client.CoreV1Api(api)
        self.pods: dict[str, PodSeen] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="pod-watch")
        self.ready = threading.Event()

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(30):
            raise PhaseTimeout("pod watch did not start")

    def _loop(self) -> None:
        # Raw JSON lines, not client models: the watcher must cost little CPU, it shares the cores.
        rv: str | None = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    listing = self.core.list_namespaced_pod(
                        NAMESPACE, label_selector="fermata.dev/run", _preload_content=False
                    )
                    rv = json.loads(listing.data)["metadata"]["resourceVersion"]
                    self.ready.set()
                resp = self.core.list_namespaced_pod(
                    NAMESPACE,
                    label_selector="fermata.dev/run",
                    resource_version=rv,
                    watch=True,
                    timeout_seconds=60,
                    _preload_content=False,
                    _request_timeout=(5, 90),
                )
                pending = b""
                for chunk in resp.stream(65536, decode_content=True):
                    now = time.monotonic()
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            rv = self._on_event(json.loads(line), now) or rv
                    if self.stop.is_set():
                        break
                resp.release_conn()
            except ApiException:
                rv = None
                time.sleep(0.2)
            except Exception:
                time.sleep(0.2)

    def _on_event(self, event: dict[str, Any], now: float) -> str | None:
        pod = event.get("object") or {}
        if event.get("type") == "ERROR":
            raise ApiException(status=pod.get("code"), reason="watch error: relist")
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        with self.lock:
            seen = self.pods.setdefault(meta.get("name", "?"), PodSeen())
            if seen.added is None:
                seen.added = now
            if status.get("phase") == "Running" and seen.running is None:
                seen.running = now
            if status.get("startTime") and seen.start_time is None:
                seen.start_time = status["startTime"].replace("Z", "+00:00")
            if meta.get("deletionTimestamp") and seen.deleting is None:
                seen.deleting = now
        rv: str | None = meta.get("resourceVersion")
        return rv

    def get(self, name: str) -> PodSeen | None:
        with self.lock:
            return self.pods.get(name)

    def count(self, pred: Callable[[PodSeen], bool]) -> int:
        with self.lock:
            return sum(1 for p in self.pods.values() if pred(p))


# ----------------------------------------------------------------------------- node simulators


class NodeSimulator:
    """Python test kubelets, each playing a slice of the nodes, as separate processes."""

    def __init__(self, kubeconfig: Path, nodes: list[dict[str, Any]], workdir: Path, args: Any):
        self.kubeconfig = kubeconfig
        self.nodes = nodes
        self.workdir = workdir
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        per = self.args.nodes_per_kubelet
        for i in range(0, len(self.nodes), per):
            path = self.workdir / f"nodes-{i // per}.yaml"
            path.write_text(yaml.safe_dump(self.nodes[i : i + per]))
            log = (self.workdir / f"kubelet-{i // per}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fermata_dev.kubelet",
                        "--kubeconfig",
                        str(self.kubeconfig),
                        "--nodes",
                        str(path),
                        "--heartbeat-interval",
                        str(self.args.node_status_seconds),
                        "--workdir",
                        str(self.workdir / f"kubelet-{i // per}"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "FERMATA_LOG_FORMAT": "json", "FERMATA_LOG_LEVEL": "WARNING"},
                    start_new_session=True,
                )
            )

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(OSError):
                total += proc_cpu_seconds(p.pid)
        return total

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


# ----------------------------------------------------------------------------- audit log


def audit_counts(path: Path, since: datetime, until: datetime) -> tuple[Counter[str], Counter[str]]:
    """Operator requests in [since, until) from the audit log: by user agent, and by verb+resource."""
    agents: Counter[str] = Counter()
    verbs: Counter[str] = Counter()
    if not path.exists():
        return agents, verbs
    with path.open() as fh:
        for line in fh:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            ua = ev.get("userAgent", "")
            if not ua.startswith(OPERATOR_AGENTS):
                continue
            ts = datetime.fromisoformat(ev["stageTimestamp"].replace("Z", "+00:00"))
            if not since <= ts < until:
                continue
            agent = ua.split("/")[0]
            agents[agent] += 1
            ref = ev.get("objectRef") or {}
            res = ref.get("resource", "?") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            verbs[f"{agent} {ev.get('verb')} {res}"] += 1
    return agents, verbs


# ----------------------------------------------------------------------------- one scale point


@dataclass
class Result:
    runs: int
    nodes: int
    create_seconds: float = float("nan")
    all_pods_seconds: float = float("nan")
    latency_p50: float = float("nan")
    latency_p95: float = float("nan")
    latency_max: float = float("nan")
    all_running_seconds: float = float("nan")
    cpu_startup_s: float = float("nan")
    cpu_burst_s: float = float("nan")
    cpu_to_running_s: float = float("nan")
    steady_window_s: float = float("nan")
    steady_cpu_share: float = float("nan")
    steady_requests: int = 0
    req_per_run_min: float = float("nan")
    steady_breakdown: dict[str, int] = field(default_factory=dict)
    peak_rss_mib: float = float("nan")
    rss_end_mib: float = float("nan")
    interrupt_p50: float = float("nan")
    interrupt_max: float = float("nan")
    interrupt_samples: list[float] = field(default_factory=list)
    overshoot_s: list[float] = field(default_factory=list)
    overshoot_billed_s: list[float] = field(default_factory=list)
    simulator_cpu_s: float = float("nan")
    apiserver_cpu_burst_s: float = float("nan")
    machine_busy_burst: float = float("nan")
    bench_cpu_burst_s: float = float("nan")
    apiserver_cpu_steady_share: float = float("nan")
    errors: list[str] = field(default_factory=list)
    operator_tracebacks: int = 0


def make_nodes(n: int) -> list[dict[str, Any]]:
    zones = ["us-east-1a", "us-east-1b", "us-east-1c"]
    return [
        {
            "name": f"gpu-{i:04d}",
            "instanceType": "g4dn.xlarge",
            "capacityType": "spot",
            "zone": zones[i % 3],
            "gpus": 1,
        }
        for i in range(n)
    ]


def measure(n: int, args: Any, workroot: Path) -> Result:
    work = workroot / f"n{n}"
    work.mkdir(parents=True)
    crd = work / "crd.yaml"
    crd.write_text(render())
    policy = work / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    audit = work / "audit.log"
    spare = args.spare_nodes
    res = Result(runs=n, nodes=n + spare)
    cp = LocalControlPlane(
        work / "cp",
        ensure_built(),
        crds=[crd],
        extra_apiserver_args=[]
        if args.no_audit
        else [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit}",
            "--audit-log-format=json",
            "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=1s",
        ],
    )
    sim: NodeSimulator | None = None
    op: subprocess.Popen[bytes] | None = None
    watcher: PodWatcher | None = None
    cp.start()
    try:
        cp.kubectl("apply", "--server-side", "-f", str(crd), check=True)
        cp.kubectl("wait", "--for=condition=Established", "crd/trainingruns.fermata.dev", check=True)
        api = cp.api_client()
        api.configuration.connection_pool_maxsize = 32
        api = client.ApiClient(api.configuration)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        wait_until(
            lambda: bool(core.list_namespaced_service_account(NAMESPACE).items), 30, "default service account"
        )
        sim = NodeSimulator(cp.kubeconfig, make_nodes(n + spare), work, args)
        t = time.monotonic()
        sim.start()
        wait_until(
            lambda: len(core.list_node(label_selector="nvidia.com/gpu.present=true").items) >= n + spare,
            args.phase_timeout,
            f"{n + spare} nodes registered",
            interval=1.0,
        )
        print(f"  [{n}] {n + spare} nodes registered in {time.monotonic() - t:.1f}s", flush=True)

        oplog = work / "operator.log"
        env = {
            **os.environ,
            "KUBECONFIG": str(cp.kubeconfig),
            "FERMATA_LOG_FORMAT": "json",
            "FERMATA_RESYNC_SECONDS": str(args.resync),
            "FERMATA_PRICE_TABLE": "fermata-system/absent",
            "PYTHONPATH": f"{args.operator_src}:{Path(args.operator_src).parent / 'trainer'}",
        }
        op = subprocess.Popen(
            [sys.executable, "-m", "fermata_operator"],
            stdout=oplog.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_until(lambda: "operator started" in oplog.read_text(errors="replace"), 60, "operator start")
        time.sleep(2.0)  # watches established
        res.cpu_startup_s = proc_cpu_seconds(op.pid)

        watcher = PodWatcher(api)
        watcher.start()
        created: dict[str, float] = {}
        names = [f"run-{i:04d}" for i in range(n)]
        body_of = lambda name: {  # noqa: E731
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": name},
            "spec": run_spec(),
        }

        def create(name: str) -> None:
            created[name] = time.monotonic()
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body_of(name))

        apiserver_pid = cp._processes["apiserver"].popen.pid  # type: ignore[union-attr]
        cpu0, acpu0 = proc_cpu_seconds(op.pid), proc_cpu_seconds(apiserver_pid)
        busy0, _ = machine_busy_cores()
        self0 = time.process_time()
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.create_threads) as pool:
            list(pool.map(create, names))
        res.create_seconds = time.monotonic() - t0
        print(f"  [{n}] {n} runs created in {res.create_seconds:.1f}s", flush=True)
        try:
            wait_until(
                lambda: watcher.count(lambda p: p.added is not None) >= n,
                args.phase_timeout,
                f"{n} pods",
                interval=0.05,
            )
        except PhaseTimeout as exc:
            res.errors.append(str(exc))
        lat = []
        last = t0
        for name in names:
            seen = watcher.get(f"{name}-0")
            if seen is not None and seen.added is not None:
                lat.append(seen.added - created[name])
                last = max(last, seen.added)
        res.all_pods_seconds = last - t0 if len(lat) == n else float("nan")
        res.cpu_burst_s = proc_cpu_seconds(op.pid) - cpu0
        res.apiserver_cpu_burst_s = proc_cpu_seconds(apiserver_pid) - acpu0
        res.bench_cpu_burst_s = time.process_time() - self0
        res.machine_busy_burst = (machine_busy_cores()[0] - busy0) / (time.monotonic() - t0)
        if lat:
            res.latency_p50, res.latency_p95, res.latency_max = pct(lat, 0.5), pct(lat, 0.95), max(lat)
        print(
            f"  [{n}] pods: {len(lat)}/{n}, all in {res.all_pods_seconds:.1f}s, "
            f"p50 {res.latency_p50:.2f}s p95 {res.latency_p95:.2f}s; operator CPU {res.cpu_burst_s:.1f}s",
            flush=True,
        )

        def all_running() -> bool:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
            return sum(1 for r in items if (r.get("status") or {}).get("phase") == "Running") >= n

        try:
            wait_until(
                lambda: watcher.count(lambda p: p.running is not None) >= n,
                args.phase_timeout,
                "pods Running",
                interval=0.5,
            )
            wait_until(all_running, args.phase_timeout, "runs Running", interval=2.0)
            res.all_running_seconds = time.monotonic() - t0
        except PhaseTimeout as exc:
            res.errors.append(str(exc))
        res.cpu_to_running_s = proc_cpu_seconds(op.pid) - cpu0
        print(f"  [{n}] all Running after {res.all_running_seconds:.1f}s", flush=True)

        # Steady state: runs Running, nothing happening but time (and cost) passing.
        time.sleep(args.settle)
        since = datetime.now(UTC)
        c0, ac0, w0 = proc_cpu_seconds(op.pid), proc_cpu_seconds(apiserver_pid), time.monotonic()
        time.sleep(args.window)
        until = datetime.now(UTC)
        res.steady_window_s = time.monotonic() - w0
        res.steady_cpu_share = (proc_cpu_seconds(op.pid) - c0) / res.steady_window_s
        res.apiserver_cpu_steady_share = (proc_cpu_seconds(apiserver_pid) - ac0) / res.steady_window_s
        time.sleep(2.5)  # the audit batch flushes every second
        agents, verbs = audit_counts(audit, since, until)
        res.steady_requests = sum(agents.values())
        res.req_per_run_min = res.steady_requests / n / (res.steady_window_s / 60.0)
        res.steady_breakdown = dict(verbs.most_common(12))
        print(
            f"  [{n}] steady: {res.steady_requests} operator requests in {res.steady_window_s:.0f}s = "
            f"{res.req_per_run_min:.3f}/run/min; CPU {100 * res.steady_cpu_share:.1f}%",
            flush=True,
        )

        # Interruptions under load: delete a pod, time until its replacement exists.
        for name in names[: args.interruptions]:
            t = time.monotonic()
            core.delete_namespaced_pod(f"{name}-0", NAMESPACE)
            try:
                wait_until(
                    lambda name=name: (s := watcher.get(f"{name}-1")) is not None and s.added is not None,
                    60,
                    f"{name}-1",
                    interval=0.02,
                )
                seen = watcher.get(f"{name}-1")
                assert seen is not None and seen.added is not None
                res.interrupt_samples.append(seen.added - t)
            except PhaseTimeout as exc:
                res.errors.append(str(exc))
            time.sleep(0.5)
        if res.interrupt_samples:
            res.interrupt_p50 = pct(res.interrupt_samples, 0.5)
            res.interrupt_max = max(res.interrupt_samples)
        print(
            f"  [{n}] interruption → new pod: p50 {res.interrupt_p50:.2f}s max {res.interrupt_max:.2f}s",
            flush=True,
        )

        # Budget overshoot: tiny budget, high price.
        rate = args.probe_hourly_usd / 3600.0  # $/s
        probes = [f"budget-{i}" for i in range(args.budget_probes)]
        for name in probes:
            spec = run_spec(
                budget={
                    "maxUSD": args.probe_budget_usd,
                    "prices": [
                        {
                            "instanceType": "g4dn.xlarge",
                            "capacityType": "spot",
                            "hourlyUSD": args.probe_hourly_usd,
                        }
                    ],
                }
            )
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                NAMESPACE,
                PLURAL,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "TrainingRun",
                    "metadata": {"name": name},
                    "spec": spec,
                },
            )
        budget_seconds = args.probe_budget_usd / rate
        for name in probes:
            try:
                wait_until(
                    lambda name=name: (s := watcher.get(f"{name}-0")) is not None and s.deleting is not None,
                    budget_seconds + 60,
                    f"{name} stopped",
                    interval=0.02,
                )
            except PhaseTimeout as exc:
                res.errors.append(str(exc))
                continue
            seen = watcher.get(f"{name}-0")
            assert seen is not None and seen.deleting is not None
            if seen.start_time is None:
                res.errors.append(f"{name}-0: no startTime seen")
                continue
            start = datetime.fromisoformat(seen.start_time)
            # monotonic ↔ wall clock: both on this machine.
            crossing_wall = start.timestamp() + budget_seconds
            deleting_wall = time.time() - (time.monotonic() - seen.deleting)
            res.overshoot_s.append(deleting_wall - crossing_wall)
        for name in probes:
            try:
                st = wait_until(
                    lambda name=name: bool(
                        (
                            custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name).get(
                                "status"
                            )
                            or {}
                        )
                        .get("cost", {})
                        .get("segments")
                        and all(
                            s.get("end")
                            for s in custom.get_namespaced_custom_object(
                                GROUP, VERSION, NAMESPACE, PLURAL, name
                            )["status"]["cost"]["segments"]
                        )
                    ),
                    30,
                    f"{name} segment closed",
                )
                del st
                status = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)[
                    "status"
                ]
                accrued = float(status["cost"]["accruedUSD"])
                res.overshoot_billed_s.append((accrued - args.probe_budget_usd) / rate)
            except PhaseTimeout as exc:
                res.errors.append(str(exc))
        print(
            f"  [{n}] budget crossing → pod deletion: {[round(x, 2) for x in res.overshoot_s]}s; "
            f"billed past budget: {[round(x, 2) for x in res.overshoot_billed_s]}s",
            flush=True,
        )
        res.peak_rss_mib = proc_peak_rss_mib(op.pid)
        res.rss_end_mib = proc_rss_mib(op.pid)
        res.simulator_cpu_s = sim.cpu_seconds()
        text = oplog.read_text(errors="replace")
        res.operator_tracebacks = text.count("Traceback")
        if args.keep:
            shutil.copy(oplog, workroot / f"operator-n{n}.log")
    finally:
        if watcher is not None:
            watcher.stop.set()
        if op is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(op.pid, signal.SIGTERM)
            try:
                op.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(op.pid, signal.SIGKILL)
                op.wait(5)
        if sim is not None:
            sim.stop()
        cp.stop()
    return res


# ----------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    rows = [
        ("runs (nodes)", lambda r: f"{r.runs} ({r.nodes})"),
        ("create N runs (client)", lambda r: f"{r.create_seconds:.1f} s"),
        ("all runs have their pod", lambda r: f"{r.all_pods_seconds:.1f} s"),
        (
            "create→pod p50 / p95 / max",
            lambda r: f"{r.latency_p50:.2f} / {r.latency_p95:.2f} / {r.latency_max:.2f} s",
        ),
        ("all pods and runs Running", lambda r: f"{r.all_running_seconds:.1f} s"),
        ("operator CPU: start-up", lambda r: f"{r.cpu_startup_s:.1f} s"),
        ("operator CPU: create→all pods", lambda r: f"{r.cpu_burst_s:.1f} s"),
        ("operator CPU: create→all Running", lambda r: f"{r.cpu_to_running_s:.1f} s"),
        ("operator CPU at steady state", lambda r: f"{100 * r.steady_cpu_share:.1f} % of a core"),
        ("operator peak RSS (VmHWM)", lambda r: f"{r.peak_rss_mib:.0f} MiB"),
        (
            "steady API requests / run / min",
            lambda r: f"{r.req_per_run_min:.3f} ({r.steady_requests} in {r.steady_window_s:.0f} s)",
        ),
        ("interruption → new pod p50 / max", lambda r: f"{r.interrupt_p50:.2f} / {r.interrupt_max:.2f} s"),
        (
            "budget crossing → pod deleted",
            lambda r: " ".join(f"{x:.2f}" for x in r.overshoot_s) + " s" if r.overshoot_s else "-",
        ),
        (
            "billed past budget",
            lambda r: " ".join(f"{x:.1f}" for x in r.overshoot_billed_s) + " s"
            if r.overshoot_billed_s
            else "-",
        ),
        ("API server CPU: create→all pods", lambda r: f"{r.apiserver_cpu_burst_s:.1f} s"),
        (
            "machine CPU busy, create→all pods",
            lambda r: f"{r.machine_busy_burst:.2f} of {os.cpu_count()} cores",
        ),
        ("benchmark client CPU, create→all pods", lambda r: f"{r.bench_cpu_burst_s:.1f} s"),
        ("API server CPU at steady state", lambda r: f"{100 * r.apiserver_cpu_steady_share:.1f} % of a core"),
        ("node simulator CPU (whole run)", lambda r: f"{r.simulator_cpu_s:.1f} s"),
        ("operator tracebacks in log", lambda r: str(r.operator_tracebacks)),
    ]
    width = max(len(k) for k, _ in rows)
    cols = [[fn(r) for r in results] for _, fn in rows]
    cw = [max(len(c[i]) for c in cols) for i in range(len(results))]
    lines = []
    for (label, _), cells in zip(rows, cols, strict=True):
        lines.append(
            f"| {label:<{width}} | " + " | ".join(f"{c:>{cw[i]}}" for i, c in enumerate(cells)) + " |"
        )
    sep = "|" + "-" * (width + 2) + "|" + "|".join("-" * (w + 2) for w in cw) + "|"
    return "\n".join([lines[0], sep, *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--nodes-per-kubelet", type=int, default=500)
    p.add_argument("--node-status-seconds", type=float, default=300.0)
    p.add_argument("--spare-nodes", type=int, default=8)
    p.add_argument("--resync", type=float, default=60.0, help="FERMATA_RESYNC_SECONDS of the operator")
    p.add_argument("--create-threads", type=int, default=8)
    p.add_argument("--settle", type=float, default=20.0, help="seconds after all Running before the window")
    p.add_argument("--window", type=float, default=120.0, help="steady-state window, seconds")
    p.add_argument("--interruptions", type=int, default=5)
    p.add_argument("--budget-probes", type=int, default=3)
    p.add_argument("--probe-budget-usd", type=float, default=2.0)
    p.add_argument("--probe-hourly-usd", type=float, default=720.0)
    p.add_argument("--phase-timeout", type=float, default=300.0)
    p.add_argument(
        "--operator-src",
        default=str(ROOT / "operator"),
        help="the operator package's parent folder (e.g. a git worktree of another commit, to compare)",
    )
    p.add_argument(
        "--no-audit", action="store_true", help="no audit log (no request counts; its overhead gone)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--keep", type=Path, help="keep the work directory (logs, audit) here")
    args = p.parse_args(argv)
    workroot = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fermata-scale-"))
    workroot.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    failed = False
    try:
        for n in args.runs:
            print(f"N = {n}", flush=True)
            t = time.monotonic()
            r = measure(n, args, workroot)
            results.append(r)
            failed |= bool(r.errors)
            for e in r.errors:
                print(f"  [{n}] ERROR {e}", flush=True)
            print(f"  [{n}] done in {time.monotonic() - t:.0f}s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
