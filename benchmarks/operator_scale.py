"""How the operator scales, next to what the cluster itself and the in-tree Job controller do.

For each N (default 100, 300, 1000) and each repetition (``--reps``, default 3) the benchmark
starts a fresh local control plane (the real kube-apiserver + etcd, kube-controller-manager and
kube-scheduler of ``tests/cluster``, with an audit log), registers N + spare one-GPU
``g4dn.xlarge`` spot nodes played by a node simulator, and then measures, one column after
another on that same control plane and the same nodes:

``direct`` — **limit (direct pods)**
    N pods created by the benchmark's client, the scheduling shape of a trainer pod (one GPU,
    the trainer's node affinity for spot ``g4dn.xlarge`` and its GPU and spot tolerations, so
    each pod needs a node of its own) and a trivial command: what the control plane, scheduler
    and node simulator themselves can do.
``job-default`` — **Job (default QPS)**
    N ``batch/v1`` Jobs (parallelism 1, completions 1, backoffLimit 0, the same pod template)
    reconciled by kube-controller-manager's in-tree ``job`` controller as shipped: the client
    rate limits are the upstream defaults (``--kube-api-qps 20 --kube-api-burst 30``;
    ``LocalControlPlane`` passes neither), per controller client.
``job-raised`` — **Job (raised QPS)**
    the same, after restarting only the kube-controller-manager process with ``--raised-cm-args``
    (default ``--kube-api-qps=1000 --kube-api-burst=2000``): same API server, etcd, scheduler and
    nodes; the cheapest correct way (a second control plane would need its own nodes).
``fermata`` — **Fermata**
    N TrainingRuns reconciled by the operator, started as its own process (cluster-wide,
    ``python -m fermata_operator``) just before the column; the first create waits until it is
    idle (its initial lists of nodes and pods processed: under 0.05 CPU s in a second), as the
    already-running job controller is. The runs use
    ``spec.preparation.mode: Trainer``: each goes straight to its GPU trainer pod (the default,
    ``Pod``, first runs a CPU preparation pod, which the simulated nodes never complete). The
    controller-manager keeps the raised flags in this column (none of its controllers acts in it).

Columns always run in that order (``--columns`` picks a subset). Before a Job column a probe
Job (whose pod fits no node) shows the job controller is synced. Between columns the previous
column's objects are deleted (pods with grace period 0, as a kubelet's final delete; the Job
controller's ``batch.kubernetes.io/job-tracking`` finalizers are removed by the benchmark), and
the next column starts only when no pod of it is left, so it starts on idle nodes. Every
column creates its N objects as fast as ``--create-threads`` client threads can, and gets:

* **all pods**: seconds from the first create to the moment a watch has seen every object's
  pod ``ADDED``; each object's create → pod latency (p50/p95/max; "create" is when the request
  was sent). For direct pods the pod is the object, so this is the create request itself;
* **all Running**: until every pod is Running (watch) *and* every object says so (a Job's
  ``status.ready``, a TrainingRun's ``status.phase``; seen through a watch on the objects);
* **requests per object** until all Running, from the API server's audit log, by user agent:
  the benchmark's create client (``fermata-bench-create/*``) for direct pods, the job
  controller's own client for Jobs (``.../job-controller``: with
  ``--use-service-account-credentials=false`` every controller of kube-controller-manager
  authenticates as the same user, but each has its own client and user agent; the list/watch
  of the shared informers are not counted), ``fermata-operator/*`` and ``kopf/*`` for Fermata;
  by verb and resource in the JSON;
* **controller CPU seconds** (``utime + stime``) and **peak RSS** (``VmHWM``, reset at the start
  of the column through ``/proc/<pid>/clear_refs``) of the controller process: the whole
  kube-controller-manager for Jobs (it also runs the garbage collector, namespace,
  service-account and root-CA publisher controllers), the operator for Fermata (its peak
  includes its start-up); none for direct pods.

Fermata's extra phases (``--fermata-extras``, default on except with ``--sensitivity``) follow its
column as before: steady-state API traffic and CPU over ``--window``, interruption → replacement
pod, budget crossing → pod deletion.

**Cluster size.** ``--extra-nodes-factor F`` makes F·N + spare nodes: the N + spare GPU nodes
plus (F − 1)·N CPU-only nodes (``m5.xlarge``, on-demand, no GPU, labelled
``bench.fermata.dev/pool=extra``, which no column's pod tolerates or selects: the GPU capacity
the columns see is the same). ``--unrelated-pods M`` (a number, or ``2N``) creates M plain pods
in namespace ``unrelated`` (no Fermata labels, 100m CPU / 128 MiB, no GPU, a nodeSelector for
the extra pool) and waits until they are Running before the first column. ``--sensitivity``
runs, per N and repetition, a clean cluster (N + spare nodes) and a big one
(``--sensitivity-factor`` 3, ``--sensitivity-unrelated`` 2N) with the direct and Fermata columns
and prints big/clean ratios for both: the direct column's ratio is what the bigger cluster costs
the control plane and simulator themselves.

Nodes are played by the Python test kubelet (:mod:`fermata_dev.kubelet`), one process per
``--nodes-per-kubelet`` nodes, in ``auto`` mode (a bound pod goes Running at once; a deleted pod
is ended and finally deleted as a kubelet does), posting node status every
``--node-status-seconds`` (no node lifecycle controller runs, so nodes stay Ready).

Run (times estimated for 2 cores from N = 20 runs and the single-column figures)::

    .venv/bin/python benchmarks/operator_scale.py                 # N = 100, 300, 1000, 3 reps: ~1 h
    .venv/bin/python benchmarks/operator_scale.py --no-extras     # the same without extras: ~35-40 min
    .venv/bin/python benchmarks/operator_scale.py --sensitivity --json out.json    # ~30-40 min
    .venv/bin/python benchmarks/operator_scale.py --columns fermata --reps 1   # Fermata alone

The result is a Markdown table (one row per N × column, median [min–max] over repetitions) and
the per-repetition ratios Fermata / peer and Fermata / limit; ``--json`` writes every raw
figure. Every phase has a time limit; the benchmark prints what it measured and exits non-zero
when a phase timed out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
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
from fermata_api.meta import CAPACITY_LABELS, GPU_RESOURCE, INSTANCE_TYPE_LABEL, LABEL_RUN  # noqa: E402
from fermata_dev.cluster import (  # noqa: E402
    DEFAULT_CONTROLLERS,
    LocalControlPlane,
    _terminate,
    ensure_built,
    wait_for_service_account,
)
from fermata_operator.crdgen import render  # noqa: E402
from fermata_operator.settings import DEFAULT_GPU_TOLERATIONS, DEFAULT_SPOT_TOLERATIONS  # noqa: E402

GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL
NAMESPACE = "bench"  # the Fermata column's
CLK_TCK = os.sysconf("SC_CLK_TCK")
OPERATOR_AGENTS = ("fermata-operator/", "kopf/")
CREATE_AGENT = "fermata-bench-create/1"
JOB_CONTROLLER_AGENT_SUFFIX = "/job-controller"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
JOB_FINALIZER = "batch.kubernetes.io/job-tracking"
COLUMN_LABEL = "bench.fermata.dev/column"
OBJECT_LABEL = "bench.fermata.dev/object"
POOL_LABEL = "bench.fermata.dev/pool"
UNRELATED_NAMESPACE = "unrelated"
PROBE_NAMESPACE = "bench-probe"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [{"level": "Metadata"}],
}

COLUMNS = ("direct", "job-default", "job-raised", "fermata")
TITLES = {
    "direct": "limit (direct pods)",
    "job-default": "Job (default QPS)",
    "job-raised": "Job (raised QPS)",
    "fermata": "Fermata",
}
COLUMN_NAMESPACES = {
    "direct": "bench-direct",
    "job-default": "bench-job-default",
    "job-raised": "bench-job-raised",
    "fermata": NAMESPACE,
}
OBJECT_PREFIX = {"direct": "pod", "job-default": "job", "job-raised": "job", "fermata": "run"}


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


def proc_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def machine_busy_cores() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def _proc_status_mib(pid: int | None, key: str) -> float:
    if pid is None:
        return float("nan")
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def proc_peak_rss_mib(pid: int | None) -> float:
    return _proc_status_mib(pid, "VmHWM:")


def proc_rss_mib(pid: int | None) -> float:
    return _proc_status_mib(pid, "VmRSS:")


def reset_peak_rss(pid: int | None) -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``5`` to ``/proc/<pid>/clear_refs``)."""
    if pid is None:
        return False
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def finish(resp: Any) -> None:
    """Read a raw (``_preload_content=False``) response to its end and give its connection back
    to the pool: a connection with unread data in the pool breaks the next request on it."""
    with contextlib.suppress(Exception):
        resp.data  # noqa: B018
        resp.release_conn()


def raw_body(resp: Any) -> bytes:
    """The body of a raw response; its connection goes back to the pool."""
    try:
        return bytes(resp.data)
    finally:
        resp.release_conn()


def finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x) and not math.isinf(x)


def ratio(a: float, b: float) -> float:
    return a / b if finite(a) and finite(b) and b > 0 else float("nan")


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
        # The GPU pod prepares the data itself: a run goes straight to its trainer pod (mode Pod,
        # the default, runs a CPU preparation pod first, which auto-mode nodes never complete).
        "preparation": {"mode": "Trainer"},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def gpu_pod_spec(node_selector: dict[str, str] | None = None) -> dict[str, Any]:
    """The scheduling shape of the trainer pod the operator makes for :func:`run_spec`: its
    resources (500m / 1Gi / one GPU), node affinity (spot ``g4dn.xlarge`` by Karpenter's or EKS's
    label), GPU and spot tolerations. The rest is a trivial pod. Checked against the Fermata
    column's real pods after the run (``shape_check``)."""
    types = {"key": INSTANCE_TYPE_LABEL, "operator": "In", "values": ["g4dn.xlarge"]}
    terms = [
        {"matchExpressions": [{"key": key, "operator": "In", "values": [values["spot"]]}, types]}
        for key, values in CAPACITY_LABELS.items()
    ]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        },
        # A trainer pod's on spot GPU capacity (the operator's defaults).
        "tolerations": [*DEFAULT_GPU_TOLERATIONS, *DEFAULT_SPOT_TOLERATIONS],
        "containers": [
            {
                "name": "main",
                "image": "busybox:1.36",
                "command": ["sleep", "infinity"],
                "resources": {
                    "requests": {"cpu": "500m", "memory": "1Gi", GPU_RESOURCE: "1"},
                    "limits": {"memory": "1Gi", GPU_RESOURCE: "1"},
                },
            }
        ],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    return spec


def direct_pod(name: str, column: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {COLUMN_LABEL: column, OBJECT_LABEL: name}},
        "spec": gpu_pod_spec(),
    }


def job_body(name: str, column: str, node_selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {COLUMN_LABEL: column}},
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": 0,
            "template": {"metadata": {"labels": {COLUMN_LABEL: column}}, "spec": gpu_pod_spec(node_selector)},
        },
    }


def training_run(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": spec or run_spec(),
    }


def unrelated_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "unrelated", OBJECT_LABEL: name}},
        "spec": {
            "restartPolicy": "Always",
            "enableServiceLinks": False,
            "nodeSelector": {POOL_LABEL: "extra"},
            "containers": [
                {
                    "name": "app",
                    "image": "nginx:1.27",
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                }
            ],
        },
    }


def scheduling_shape(pod: dict[str, Any]) -> dict[str, Any]:
    """What the scheduler looks at in a pod (as the API server returned it)."""
    spec = pod.get("spec") or {}
    return {
        "affinity": spec.get("affinity"),
        "nodeSelector": spec.get("nodeSelector"),
        "tolerations": sorted(json.dumps(t, sort_keys=True) for t in spec.get("tolerations") or []),
        "resources": [c.get("resources") for c in spec.get("containers") or []],
        "initResources": [c.get("resources") for c in spec.get("initContainers") or []],
        "priorityClassName": spec.get("priorityClassName"),
        "schedulerName": spec.get("schedulerName"),
        "topologySpreadConstraints": spec.get("topologySpreadConstraints"),
    }


# ----------------------------------------------------------------------------- watches


@dataclass
class PodSeen:
    added: float | None = None
    running: float | None = None
    deleting: float | None = None
    start_time: str | None = None


class RawWatch:
    """List + watch of one collection as raw JSON lines (client models cost CPU the cores lack)."""

    def __init__(self, list_fn: Callable[..., Any], name: str) -> None:
        self.list_fn = list_fn
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self.ready = threading.Event()

    def start(self) -> RawWatch:
        self.thread.start()
        if not self.ready.wait(30):
            raise PhaseTimeout(f"{self.thread.name} did not start")
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def handle(self, obj: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        rv: str | None = None
        while not self.stop_event.is_set():
            try:
                if rv is None:
                    listing = json.loads(self.list_fn(_preload_content=False).data)
                    now = time.monotonic()
                    for item in listing.get("items") or []:
                        self.handle(item, now)
                    rv = listing["metadata"]["resourceVersion"]
                    self.ready.set()
                resp = self.list_fn(
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
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            raise ApiException(status=obj.get("code"), reason="watch error: relist")
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            self.handle(obj, now)
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if self.stop_event.is_set():
                        resp.close()  # unread data: this connection must not go back to the pool
                        return
                resp.release_conn()
            except ApiException:
                rv = None
                time.sleep(0.2)
            except Exception:
                time.sleep(0.2)


class PodWatch(RawWatch):
    """A namespace's pods (by label selector): when each was first seen, Running, deleting; and
    per owner (the value of ``owner_label``, else the pod's name) its first pod's."""

    def __init__(self, core: Any, namespace: str, selector: str, owner_label: str | None) -> None:
        super().__init__(
            lambda **kw: core.list_namespaced_pod(namespace, label_selector=selector, **kw),
            f"pods-{namespace}",
        )
        self.owner_label = owner_label
        self.pods: dict[str, PodSeen] = {}
        self.owners: dict[str, PodSeen] = {}
        self.first_pod: dict[str, Any] | None = None

    def handle(self, pod: dict[str, Any], now: float) -> None:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        name = meta.get("name", "?")
        owner = (meta.get("labels") or {}).get(self.owner_label, name) if self.owner_label else name
        running = status.get("phase") == "Running"
        with self.lock:
            if self.first_pod is None:
                self.first_pod = pod
            seen = self.pods.setdefault(name, PodSeen())
            by_owner = self.owners.setdefault(owner, PodSeen())
            for s in (seen, by_owner):
                if s.added is None:
                    s.added = now
                if running and s.running is None:
                    s.running = now
            if status.get("startTime") and seen.start_time is None:
                seen.start_time = status["startTime"].replace("Z", "+00:00")
            if meta.get("deletionTimestamp") and seen.deleting is None:
                seen.deleting = now

    def get(self, name: str) -> PodSeen | None:
        with self.lock:
            return self.pods.get(name)

    def owner(self, name: str) -> PodSeen | None:
        with self.lock:
            return self.owners.get(name)

    def count_owners(self, names: Iterable[str], pred: Callable[[PodSeen], bool]) -> int:
        with self.lock:
            return sum(1 for n in names if (s := self.owners.get(n)) is not None and pred(s))


class ObjectWatch(RawWatch):
    """When each object of a collection first satisfied ``pred`` (e.g. reported Running)."""

    def __init__(self, list_fn: Callable[..., Any], name: str, pred: Callable[[dict[str, Any]], bool]):
        super().__init__(list_fn, name)
        self.pred = pred
        self.reached: dict[str, float] = {}

    def handle(self, obj: dict[str, Any], now: float) -> None:
        name = (obj.get("metadata") or {}).get("name", "?")
        if self.pred(obj):
            with self.lock:
                self.reached.setdefault(name, now)

    def count(self, names: Iterable[str]) -> int:
        with self.lock:
            return sum(1 for n in names if n in self.reached)

    def last(self, names: Iterable[str]) -> float | None:
        with self.lock:
            times = [self.reached[n] for n in names if n in self.reached]
        return max(times) if times else None


def job_reports_running(job: dict[str, Any]) -> bool:
    return int((job.get("status") or {}).get("ready") or 0) >= 1


def run_reports_running(run: dict[str, Any]) -> bool:
    return (run.get("status") or {}).get("phase") == "Running"


# ----------------------------------------------------------------------------- processes


class BenchControlPlane(LocalControlPlane):
    """``LocalControlPlane`` whose kube-controller-manager takes extra flags and can be
    restarted alone (same API server, etcd, scheduler, nodes) with other flags."""

    def __init__(self, *args: Any, controller_manager_args: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.controller_manager_args = list(controller_manager_args)

    def _controller_manager_argv(self) -> list[str]:
        return [*super()._controller_manager_argv(), *self.controller_manager_args]

    def restart_controller_manager(self, args: Sequence[str]) -> None:
        proc = self._processes.pop("controller-manager", None)
        if proc is not None:
            _terminate(proc, self.stop_timeout)
        self.controller_manager_args = list(args)
        self._spawn("controller-manager", self._controller_manager_argv())
        time.sleep(0.5)
        self._check_alive("controller-manager")

    def pid(self, name: str) -> int | None:
        proc = self._processes.get(name)
        return proc.popen.pid if proc is not None and proc.popen is not None else None


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
            cpu = proc_cpu_seconds(p.pid)
            if finite(cpu):
                total += cpu
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


def make_nodes(gpu: int, cpu: int) -> list[dict[str, Any]]:
    zones = ["us-east-1a", "us-east-1b", "us-east-1c"]
    nodes: list[dict[str, Any]] = [
        {
            "name": f"gpu-{i:04d}",
            "instanceType": "g4dn.xlarge",
            "capacityType": "spot",
            "zone": zones[i % 3],
            "gpus": 1,
        }
        for i in range(gpu)
    ]
    nodes += [
        {
            "name": f"cpu-{i:04d}",
            "instanceType": "m5.xlarge",
            "capacityType": "on-demand",
            "zone": zones[i % 3],
            "gpus": 0,
            "labels": {POOL_LABEL: "extra"},
        }
        for i in range(cpu)
    ]
    return nodes


# ----------------------------------------------------------------------------- audit log


def operator_agent(ua: str) -> str | None:
    return ua.split("/")[0] if ua.startswith(OPERATOR_AGENTS) else None


def job_controller_agent(ua: str) -> str | None:
    return "job-controller" if ua.endswith(JOB_CONTROLLER_AGENT_SUFFIX) else None


def create_client_agent(ua: str) -> str | None:
    return "bench-create" if ua.startswith(CREATE_AGENT.split("/")[0] + "/") else None


AGENTS: dict[str, Callable[[str], str | None]] = {
    "direct": create_client_agent,
    "job-default": job_controller_agent,
    "job-raised": job_controller_agent,
    "fermata": operator_agent,
}


def short_agent(ua: str) -> str:
    """``controller-manager/v1.35.4 (linux/amd64) kubernetes/abc/job-controller`` → ``controller-manager/job-controller``."""
    head = ua.split("/")[0]
    tail = ua.rsplit("/", 1)[-1] if " " in ua and "/" in ua.rsplit(" ", 1)[-1] else ""
    return f"{head}/{tail}" if tail and not tail[0].isdigit() else head


def audit_counts(
    path: Path,
    since: datetime,
    until: datetime,
    agent_of: Callable[[str], str | None],
    offset: int = 0,
) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Requests in [since, until) from the audit log (from byte ``offset``): the matched
    controller's by agent and by verb+resource, and everybody's by (shortened) user agent."""
    agents: Counter[str] = Counter()
    verbs: Counter[str] = Counter()
    everyone: Counter[str] = Counter()
    if not path.exists():
        return agents, verbs, everyone
    with path.open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            try:
                ev = json.loads(raw)
            except json.JSONDecodeError:
                continue
            ts = datetime.fromisoformat(ev["stageTimestamp"].replace("Z", "+00:00"))
            if not since <= ts < until:
                continue
            ref = ev.get("objectRef") or {}
            if ref.get("namespace") == PROBE_NAMESPACE:
                continue  # the job controller's readiness probe, not part of any column
            ua = ev.get("userAgent", "")
            everyone[short_agent(ua)] += 1
            agent = agent_of(ua)
            if agent is None:
                continue
            agents[agent] += 1
            res = ref.get("resource", "?") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            verbs[f"{agent} {ev.get('verb')} {res}"] += 1
    return agents, verbs, everyone


def audit_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ----------------------------------------------------------------------------- results


@dataclass
class FermataExtras:
    steady_window_s: float = float("nan")
    steady_cpu_share: float = float("nan")
    steady_requests: int = 0
    req_per_run_min: float = float("nan")
    steady_breakdown: dict[str, int] = field(default_factory=dict)
    apiserver_cpu_steady_share: float = float("nan")
    interrupt_p50: float = float("nan")
    interrupt_max: float = float("nan")
    interrupt_samples: list[float] = field(default_factory=list)
    overshoot_s: list[float] = field(default_factory=list)
    overshoot_billed_s: list[float] = field(default_factory=list)
    peak_rss_end_mib: float = float("nan")
    rss_end_mib: float = float("nan")


@dataclass
class ColumnResult:
    column: str
    title: str
    n: int
    create_seconds: float = float("nan")
    create_errors: int = 0
    pods_seen: int = 0
    all_pods_s: float = float("nan")
    latency_p50: float = float("nan")
    latency_p95: float = float("nan")
    latency_max: float = float("nan")
    pods_running_s: float = float("nan")
    objects_running_s: float = float("nan")
    all_running_s: float = float("nan")
    requests: int = 0
    req_per_object: float = float("nan")
    requests_breakdown: dict[str, int] = field(default_factory=dict)
    window_agents: dict[str, int] = field(default_factory=dict)
    controller: str = ""
    controller_args: list[str] = field(default_factory=list)
    controller_startup_cpu_s: float = float("nan")
    controller_cpu_pods_s: float = float("nan")
    controller_cpu_running_s: float = float("nan")
    controller_peak_rss_mib: float = float("nan")
    controller_peak_rss_reset: bool = False
    apiserver_cpu_running_s: float = float("nan")
    scheduler_cpu_running_s: float = float("nan")
    controller_manager_cpu_running_s: float = float("nan")
    simulator_cpu_running_s: float = float("nan")
    bench_cpu_running_s: float = float("nan")
    machine_busy_pods: float = float("nan")
    machine_busy_running: float = float("nan")
    shape: dict[str, Any] = field(default_factory=dict)
    shape_matches_fermata: bool | None = None
    #: bytes of one object and of its pod as the API server returns them (JSON, managedFields
    #: included) once all are Running: what every write and watch event of them carries
    object_bytes: int = 0
    pod_bytes: int = 0
    cleanup_s: float = float("nan")
    operator_tracebacks: int = 0
    extras: FermataExtras | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class ClusterResult:
    n: int
    rep: int
    scenario: str
    gpu_nodes: int
    cpu_nodes: int
    unrelated_pods: int
    nodes_registered_s: float = float("nan")
    unrelated_running_s: float = float("nan")
    wall_s: float = float("nan")
    simulator_cpu_s: float = float("nan")
    columns: dict[str, ColumnResult] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def all_errors(self) -> list[str]:
        return [*self.errors, *(f"{c}: {e}" for c, r in self.columns.items() for e in r.errors)]


@dataclass(frozen=True)
class Scenario:
    name: str
    factor: float
    unrelated: str

    def cpu_nodes(self, n: int) -> int:
        return max(0, round((self.factor - 1.0) * n))

    def unrelated_pods(self, n: int) -> int:
        text = self.unrelated.strip()
        if text.upper().endswith("N"):
            return round(float(text[:-1] or "1") * n)
        return int(text)


# ----------------------------------------------------------------------------- one cluster


class Bench:
    """One fresh control plane, its nodes, and the columns run on it one after another."""

    def __init__(self, n: int, rep: int, scenario: Scenario, columns: list[str], args: Any, work: Path):
        self.n, self.rep, self.scenario, self.columns, self.args, self.work = (
            n,
            rep,
            scenario,
            columns,
            args,
            work,
        )
        self.audit = work / "audit.log"
        self.res = ClusterResult(
            n=n,
            rep=rep,
            scenario=scenario.name,
            gpu_nodes=n + args.spare_nodes,
            cpu_nodes=scenario.cpu_nodes(n),
            unrelated_pods=scenario.unrelated_pods(n),
        )
        self.cp: BenchControlPlane | None = None
        self.sim: NodeSimulator | None = None
        self.op: subprocess.Popen[bytes] | None = None
        self.watches: list[RawWatch] = []
        self.raised = False
        self.api: Any = None
        self.create_api: Any = None
        self.core: Any = None
        self.custom: Any = None
        self.batch: Any = None
        self.c_core: Any = None
        self.c_custom: Any = None
        self.c_batch: Any = None
        self.tag = f"[N={n} rep {rep + 1} {scenario.name}]"

    def log(self, msg: str) -> None:
        print(f"  {self.tag} {msg}", flush=True)

    # -- set-up ------------------------------------------------------------------------------

    def run(self, binary: Path) -> ClusterResult:
        t_start = time.monotonic()
        args, work = self.args, self.work
        work.mkdir(parents=True)
        crd = work / "crd.yaml"
        crd.write_text(render())
        policy = work / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        jobs = [c for c in self.columns if c.startswith("job-")]
        # Only the raised column: start the controller-manager with its flags (no restart).
        self.raised = jobs == ["job-raised"]
        self.cp = BenchControlPlane(
            work / "cp",
            binary,
            crds=[crd],
            controllers=(*DEFAULT_CONTROLLERS, "job") if jobs else DEFAULT_CONTROLLERS,
            controller_manager_args=args.raised_cm_args.split() if self.raised else (),
            extra_apiserver_args=(["--profiling=true"] if args.apiserver_pprof else [])
            + (
                []
                if args.no_audit
                else [
                    f"--audit-policy-file={policy}",
                    f"--audit-log-path={self.audit}",
                    "--audit-log-format=json",
                    "--audit-log-mode=batch",
                    "--audit-log-batch-max-wait=1s",
                ]
            ),
        )
        try:
            self.cp.start()
            self._setup(crd)
            previous: str | None = None
            for column in self.columns:
                if previous is not None:
                    self._cleanup(previous)
                try:
                    cr = self._column(column)
                except Exception as exc:  # a broken or timed-out column: report it, go on
                    cr = self.res.columns.get(column) or ColumnResult(column, TITLES[column], self.n)
                    cr.errors.append(f"{type(exc).__name__}: {exc}"[:2000])
                self.res.columns[column] = cr
                for e in cr.errors:
                    self.log(f"{TITLES[column]}: ERROR {e}")
                previous = column
            self._shape_check()
        except PhaseTimeout as exc:
            self.res.errors.append(str(exc))
        except Exception as exc:  # set-up failed (control plane, nodes, clients)
            detail = getattr(exc, "stderr", None) or ""
            self.res.errors.append(f"{type(exc).__name__}: {exc} {detail}"[:2000])
        finally:
            for w in self.watches:
                w.stop()
            self._stop_operator()
            if self.sim is not None:
                self.res.simulator_cpu_s = self.sim.cpu_seconds()
                self.sim.stop()
            self.cp.stop()
            self.res.wall_s = time.monotonic() - t_start
        return self.res

    def _setup(self, crd: Path) -> None:
        assert self.cp is not None
        args = self.args
        cp = self.cp
        cp.kubectl("wait", "--for=condition=Established", "crd/trainingruns.fermata.dev", check=True)
        base = cp.api_client()
        base.configuration.connection_pool_maxsize = 32
        self.api = client.ApiClient(base.configuration)
        self.create_api = client.ApiClient(base.configuration)
        self.create_api.user_agent = CREATE_AGENT
        self.core, self.custom = client.CoreV1Api(self.api), client.CustomObjectsApi(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.c_core, self.c_custom = (
            client.CoreV1Api(self.create_api),
            client.CustomObjectsApi(self.create_api),
        )
        self.c_batch = client.BatchV1Api(self.create_api)
        namespaces = [COLUMN_NAMESPACES[c] for c in self.columns] + [PROBE_NAMESPACE]
        if self.res.unrelated_pods:
            namespaces.append(UNRELATED_NAMESPACE)
        for ns in namespaces:
            finish(self.core.create_namespace({"metadata": {"name": ns}}, _preload_content=False))
        for ns in namespaces:
            wait_for_service_account(self.api, ns, timeout=60)

        total = self.res.gpu_nodes + self.res.cpu_nodes
        self.sim = NodeSimulator(
            cp.kubeconfig, make_nodes(self.res.gpu_nodes, self.res.cpu_nodes), self.work, args
        )
        t = time.monotonic()
        self.sim.start()

        def registered() -> bool:
            listing = json.loads(self.core.list_node(_preload_content=False).data)
            return len(listing.get("items") or []) >= total

        wait_until(registered, args.phase_timeout, f"{total} nodes registered", interval=1.0)
        self.res.nodes_registered_s = time.monotonic() - t
        self.log(
            f"{total} nodes ({self.res.gpu_nodes} GPU, {self.res.cpu_nodes} CPU) registered "
            f"in {self.res.nodes_registered_s:.1f}s"
        )
        m = self.res.unrelated_pods
        if m:
            names = [f"app-{i:05d}" for i in range(m)]
            watch = self._watch(PodWatch(self.core, UNRELATED_NAMESPACE, "app=unrelated", None))
            t = time.monotonic()
            errors = self._create_all(
                names,
                lambda name: self.c_core.create_namespaced_pod(
                    UNRELATED_NAMESPACE, unrelated_pod(name), _preload_content=False
                ),
            )
            if errors:
                self.res.errors.append(f"unrelated pods: {errors} creates failed")
            wait_until(
                lambda: watch.count_owners(names, lambda p: p.running is not None) >= m - errors,
                args.phase_timeout,
                f"{m} unrelated pods Running",
                interval=0.5,
            )
            watch.stop()
            self.res.unrelated_running_s = time.monotonic() - t
            self.log(f"{m} unrelated pods Running in {self.res.unrelated_running_s:.1f}s")
        time.sleep(args.between_settle)

    def _watch(self, w: RawWatch) -> Any:
        self.watches.append(w)
        return w.start()

    def _start_pprof(self, column: str) -> None:
        """With ``--apiserver-pprof DIR``: a CPU profile of the API server over the column's
        first ``--pprof-seconds`` from the first create, written to DIR (``go tool pprof``), from
        a thread of its own (the profile endpoint answers when the time is up)."""
        out_dir: Path | None = self.args.apiserver_pprof
        if out_dir is None or self.cp is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"apiserver-{column}-n{self.n}-rep{self.rep + 1}-{self.res.scenario}.pprof"
        cp, seconds = self.cp, int(self.args.pprof_seconds)

        def fetch() -> None:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            req = urllib.request.Request(
                f"{cp.server}/debug/pprof/profile?seconds={seconds}",
                headers={"Authorization": f"Bearer {cp.token}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=seconds + 30, context=ctx) as resp:
                    target.write_bytes(resp.read())
            except OSError as exc:  # a profile, not a figure: say so and go on
                self.log(f"API server profile failed: {exc}")
                return
            self.log(f"API server profile: {target}")

        threading.Thread(target=fetch, daemon=True).start()

    def _create_all(self, names: list[str], create: Callable[[str], Any]) -> int:
        """Create with ``--create-threads`` threads (raw responses: no client models); retries
        429/5xx/connection errors twice; returns the number of objects that could not be made."""

        def one(name: str) -> bool:
            for attempt in range(3):
                try:
                    finish(create(name))
                    return True
                except ApiException as exc:
                    if exc.status == 409:
                        return True
                    if exc.status not in (429, 500, 502, 503, 504) or attempt == 2:
                        return False
                except Exception:
                    if attempt == 2:
                        return False
                time.sleep(0.2 * (attempt + 1))
            return False

        with ThreadPoolExecutor(self.args.create_threads) as pool:
            ok = list(pool.map(one, names))
        return ok.count(False)

    # -- one column --------------------------------------------------------------------------

    def _column(self, column: str) -> ColumnResult:
        assert self.cp is not None and self.sim is not None
        args, n, cp = self.args, self.n, self.cp
        ns = COLUMN_NAMESPACES[column]
        res = ColumnResult(column=column, title=TITLES[column], n=n)
        self.res.columns[column] = res
        names = [f"{OBJECT_PREFIX[column]}-{i:04d}" for i in range(n)]
        self.log(f"{TITLES[column]}: start")

        objects: ObjectWatch | None = None
        create: Callable[[str], Any]
        ctrl_pid: int | None = None
        if column == "direct":
            pods = self._watch(PodWatch(self.core, ns, f"{COLUMN_LABEL}={column}", OBJECT_LABEL))
            create = lambda name: self.c_core.create_namespaced_pod(  # noqa: E731
                ns, direct_pod(name, column), _preload_content=False
            )
        elif column.startswith("job-"):
            if column == "job-raised" and not self.raised:
                t = time.monotonic()
                cp.restart_controller_manager(args.raised_cm_args.split())
                self.raised = True
                self.log(f"controller-manager restarted with {args.raised_cm_args}")
                self._probe_job_controller()
                self.log(f"job controller answering {time.monotonic() - t:.1f}s after the restart")
            else:
                self._probe_job_controller()
            ctrl_pid = cp.pid("controller-manager")
            res.controller = "kube-controller-manager (all its controllers)"
            res.controller_args = list(cp.controller_manager_args)
            pods = self._watch(PodWatch(self.core, ns, f"{COLUMN_LABEL}={column}", JOB_NAME_LABEL))
            objects = self._watch(
                ObjectWatch(
                    lambda **kw: self.batch.list_namespaced_job(ns, **kw), f"jobs-{ns}", job_reports_running
                )
            )
            create = lambda name: self.c_batch.create_namespaced_job(  # noqa: E731
                ns, job_body(name, column), _preload_content=False
            )
        else:
            ctrl_pid = self._start_operator()
            res.controller = "fermata-operator"
            res.controller_startup_cpu_s = proc_cpu_seconds(ctrl_pid)
            pods = self._watch(PodWatch(self.core, ns, LABEL_RUN, LABEL_RUN))
            objects = self._watch(
                ObjectWatch(
                    lambda **kw: self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, **kw),
                    f"runs-{ns}",
                    run_reports_running,
                )
            )
            create = lambda name: self.c_custom.create_namespaced_custom_object(  # noqa: E731
                GROUP, VERSION, ns, PLURAL, training_run(name), _preload_content=False
            )

        api_pid, sched_pid, cm_pid = cp.pid("apiserver"), cp.pid("scheduler"), cp.pid("controller-manager")
        res.controller_peak_rss_reset = reset_peak_rss(ctrl_pid) if column != "fermata" else False
        created: dict[str, float] = {}

        def timed_create(name: str) -> Any:
            created.setdefault(name, time.monotonic())
            return create(name)

        offset = audit_size(self.audit)
        c0, a0, s0, m0 = (proc_cpu_seconds(p) for p in (ctrl_pid, api_pid, sched_pid, cm_pid))
        sim0, busy0, self0 = self.sim.cpu_seconds(), machine_busy_cores()[0], time.process_time()
        since = datetime.now(UTC)
        self._start_pprof(column)
        t0 = time.monotonic()
        res.create_errors = self._create_all(names, timed_create)
        res.create_seconds = time.monotonic() - t0
        if res.create_errors:
            res.errors.append(f"{res.create_errors} creates failed")
        self.log(f"{TITLES[column]}: {n} objects created in {res.create_seconds:.1f}s")

        try:
            wait_until(
                lambda: pods.count_owners(names, lambda p: p.added is not None) >= n,
                args.phase_timeout,
                f"{TITLES[column]}: {n} pods",
                interval=0.05,
            )
        except PhaseTimeout as exc:
            res.errors.append(str(exc))
        lat, last = [], t0
        for name in names:
            seen = pods.owner(name)
            if seen is not None and seen.added is not None and name in created:
                lat.append(seen.added - created[name])
                last = max(last, seen.added)
        res.pods_seen = len(lat)
        res.all_pods_s = last - t0 if len(lat) == n else float("nan")
        res.controller_cpu_pods_s = proc_cpu_seconds(ctrl_pid) - c0
        res.machine_busy_pods = (machine_busy_cores()[0] - busy0) / max(time.monotonic() - t0, 1e-6)
        if lat:
            res.latency_p50, res.latency_p95, res.latency_max = pct(lat, 0.5), pct(lat, 0.95), max(lat)
        self.log(
            f"{TITLES[column]}: pods {len(lat)}/{n}, all in {res.all_pods_s:.1f}s, "
            f"p50 {res.latency_p50:.2f}s p95 {res.latency_p95:.2f}s max {res.latency_max:.2f}s"
        )

        def all_running() -> bool:
            if pods.count_owners(names, lambda p: p.running is not None) < n:
                return False
            return objects is None or objects.count(names) >= n

        until = datetime.now(UTC)
        try:
            wait_until(all_running, args.phase_timeout, f"{TITLES[column]}: all Running", interval=0.1)
            with pods.lock:
                pod_last = max(s.running for n_ in names if (s := pods.owners.get(n_)) and s.running)
            res.pods_running_s = pod_last - t0
            obj_last = objects.last(names) if objects is not None else None
            res.objects_running_s = obj_last - t0 if obj_last is not None else float("nan")
            res.all_running_s = max(res.pods_running_s, res.objects_running_s if objects else 0.0)
            until = since + timedelta(seconds=res.all_running_s)
        except PhaseTimeout as exc:
            res.errors.append(str(exc))
            until = datetime.now(UTC)
        res.controller_cpu_running_s = proc_cpu_seconds(ctrl_pid) - c0
        res.controller_peak_rss_mib = proc_peak_rss_mib(ctrl_pid)
        res.apiserver_cpu_running_s = proc_cpu_seconds(api_pid) - a0
        res.scheduler_cpu_running_s = proc_cpu_seconds(sched_pid) - s0
        res.controller_manager_cpu_running_s = proc_cpu_seconds(cm_pid) - m0
        res.simulator_cpu_running_s = self.sim.cpu_seconds() - sim0
        res.bench_cpu_running_s = time.process_time() - self0
        res.machine_busy_running = (machine_busy_cores()[0] - busy0) / max(time.monotonic() - t0, 1e-6)
        with pods.lock:
            res.shape = scheduling_shape(pods.first_pod) if pods.first_pod else {}
        self._object_sizes(column, names[0], res)
        self.log(f"{TITLES[column]}: one object {res.object_bytes} B, its pod {res.pod_bytes} B")

        if not args.no_audit:
            time.sleep(2.5)  # the audit batch flushes every second
            agents, verbs, everyone = audit_counts(self.audit, since, until, AGENTS[column], offset)
            res.requests = sum(agents.values())
            res.req_per_object = res.requests / n
            res.requests_breakdown = dict(verbs.most_common())
            res.window_agents = dict(everyone.most_common(15))
        self.log(
            f"{TITLES[column]}: all Running after {res.all_running_s:.1f}s "
            f"(pods {res.pods_running_s:.1f}s, objects {res.objects_running_s:.1f}s); "
            f"{res.req_per_object:.2f} requests/object; controller CPU {res.controller_cpu_running_s:.1f}s, "
            f"peak RSS {res.controller_peak_rss_mib:.0f} MiB"
        )
        if column == "fermata":
            if args.fermata_extras:
                res.extras = self._fermata_extras(res, names, pods, ctrl_pid, api_pid)
            assert self.op is not None
            text = (self.work / "operator.log").read_text(errors="replace")
            res.operator_tracebacks = text.count("Traceback")
        pods.stop()
        if objects is not None:
            objects.stop()
        return res

    def _object_sizes(self, column: str, name: str, res: ColumnResult) -> None:
        """The JSON size of the column's first object and its pod (kept under ``--keep``)."""
        ns = COLUMN_NAMESPACES[column]
        try:
            if column == "fermata":
                obj = self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, name, _preload_content=False
                )
                selector = f"{LABEL_RUN}={name}"
            elif column.startswith("job-"):
                obj = self.batch.read_namespaced_job(name, ns, _preload_content=False)
                selector = f"{JOB_NAME_LABEL}={name}"
            else:
                obj, selector = None, ""
            if obj is not None:
                body = raw_body(obj)
                res.object_bytes = len(body)
                pods = json.loads(
                    raw_body(
                        self.core.list_namespaced_pod(ns, label_selector=selector, _preload_content=False)
                    )
                )
                items = pods.get("items") or []
                pod = json.dumps(items[0], separators=(",", ":")).encode() if items else b""
            else:
                body = b""
                pod = raw_body(self.core.read_namespaced_pod(name, ns, _preload_content=False))
            res.pod_bytes = len(pod)
            if self.args.keep is not None:
                out = self.args.keep / f"sample-{column}-n{self.n}-rep{self.rep + 1}"
                out.mkdir(parents=True, exist_ok=True)
                if body:
                    (out / "object.json").write_bytes(body)
                (out / "pod.json").write_bytes(pod)
        except Exception as exc:  # a figure, not a phase: report and go on
            res.errors.append(f"object sizes: {type(exc).__name__}: {exc}"[:500])

    # -- between columns ---------------------------------------------------------------------

    def _cleanup(self, column: str) -> None:
        """Delete the column's objects and pods; return when none of its pods is left."""
        ns, t = COLUMN_NAMESPACES[column], time.monotonic()
        if column == "fermata":
            self._stop_operator()  # never reached: Fermata's column is always the last
        if column.startswith("job-"):
            finish(
                self.batch.delete_collection_namespaced_job(
                    ns, propagation_policy="Background", _preload_content=False
                )
            )
        self._delete_pods(ns)
        wait_until(lambda: not self._pods_left(ns), self.args.phase_timeout, f"{ns}: pods gone", 0.5)
        if column.startswith("job-"):
            wait_until(lambda: not self._jobs_left(ns), self.args.phase_timeout, f"{ns}: jobs gone", 0.5)
        self.res.columns[column].cleanup_s = time.monotonic() - t
        self.log(f"{TITLES[column]}: objects and pods gone in {time.monotonic() - t:.1f}s; nodes idle")
        time.sleep(self.args.between_settle)

    def _delete_pods(self, ns: str) -> None:
        finish(self.core.delete_collection_namespaced_pod(ns, grace_period_seconds=0, _preload_content=False))
        listing = json.loads(self.core.list_namespaced_pod(ns, _preload_content=False).data)
        held = [
            p["metadata"]["name"]
            for p in listing.get("items") or []
            if JOB_FINALIZER in (p["metadata"].get("finalizers") or [])
        ]

        def strip(name: str) -> None:
            with contextlib.suppress(ApiException):
                finish(
                    self.core.patch_namespaced_pod(
                        name, ns, {"metadata": {"finalizers": None}}, _preload_content=False
                    )
                )

        if held:
            with ThreadPoolExecutor(self.args.create_threads) as pool:
                list(pool.map(strip, held))

    def _pods_left(self, ns: str) -> bool:
        listing = json.loads(self.core.list_namespaced_pod(ns, limit=1, _preload_content=False).data)
        return bool(listing.get("items"))

    def _jobs_left(self, ns: str) -> bool:
        listing = json.loads(self.batch.list_namespaced_job(ns, limit=1, _preload_content=False).data)
        return bool(listing.get("items"))

    def _probe_job_controller(self) -> None:
        """A Job whose pod fits no node: once its pod exists the job controller is synced."""
        name = f"probe-{int(time.time() * 1000) % 10**9}"
        finish(
            self.c_batch.create_namespaced_job(
                PROBE_NAMESPACE, job_body(name, "probe", {POOL_LABEL: "nowhere"}), _preload_content=False
            )
        )
        wait_until(
            lambda: self._pods_left(PROBE_NAMESPACE), 120, "job controller: probe Job's pod", interval=0.2
        )
        finish(
            self.batch.delete_collection_namespaced_job(
                PROBE_NAMESPACE, propagation_policy="Background", _preload_content=False
            )
        )
        self._delete_pods(PROBE_NAMESPACE)
        wait_until(lambda: not self._pods_left(PROBE_NAMESPACE), 60, "probe pod gone", interval=0.2)

    # -- the operator ------------------------------------------------------------------------

    def _start_operator(self) -> int:
        assert self.cp is not None
        oplog = self.work / "operator.log"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cp.kubeconfig),
            "FERMATA_LOG_FORMAT": "json",
            "FERMATA_RESYNC_SECONDS": str(self.args.resync),
            "FERMATA_PRICE_TABLE": "fermata-system/absent",
            # As the chart configures it (operator.nodeLabelSelector's default); an older
            # operator (--operator-src) ignores it.
            "FERMATA_NODE_LABEL_SELECTOR": "karpenter.sh/capacity-type",
            "PYTHONPATH": ":".join(
                str(Path(self.args.operator_src).parent / d) for d in ("operator", "api", "trainer")
            ),
        }
        self.op = subprocess.Popen(
            [sys.executable, "-m", "fermata_operator"],
            stdout=oplog.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_until(lambda: "operator started" in oplog.read_text(errors="replace"), 60, "operator start")
        time.sleep(2.0)  # watches established
        # Then until it is idle: its initial lists (every node it watches, the pods) processed,
        # as a long-running operator would be when a burst arrives (the job controller is too).
        pid, deadline = self.op.pid, time.monotonic() + 60
        while time.monotonic() < deadline:
            before = proc_cpu_seconds(pid)
            time.sleep(1.0)
            if proc_cpu_seconds(pid) - before < 0.05:
                break
        return pid

    def _stop_operator(self) -> None:
        op, self.op = self.op, None
        if op is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(op.pid, signal.SIGTERM)
        try:
            op.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(op.pid, signal.SIGKILL)
            op.wait(5)

    def _fermata_extras(
        self, res: ColumnResult, names: list[str], watcher: PodWatch, op_pid: int | None, api_pid: int | None
    ) -> FermataExtras:
        args, n, custom, core = self.args, self.n, self.custom, self.core
        ex = FermataExtras()
        errors = res.errors

        # Steady state: runs Running, nothing happening but time (and cost) passing.
        time.sleep(args.settle)
        offset = audit_size(self.audit)
        since = datetime.now(UTC)
        c0, ac0, w0 = proc_cpu_seconds(op_pid), proc_cpu_seconds(api_pid), time.monotonic()
        time.sleep(args.window)
        until = datetime.now(UTC)
        ex.steady_window_s = time.monotonic() - w0
        ex.steady_cpu_share = (proc_cpu_seconds(op_pid) - c0) / ex.steady_window_s
        ex.apiserver_cpu_steady_share = (proc_cpu_seconds(api_pid) - ac0) / ex.steady_window_s
        if not args.no_audit:
            time.sleep(2.5)
            agents, verbs, _ = audit_counts(self.audit, since, until, operator_agent, offset)
            ex.steady_requests = sum(agents.values())
            ex.req_per_run_min = ex.steady_requests / n / (ex.steady_window_s / 60.0)
            ex.steady_breakdown = dict(verbs.most_common(12))
        self.log(
            f"Fermata steady: {ex.steady_requests} operator requests in {ex.steady_window_s:.0f}s = "
            f"{ex.req_per_run_min:.3f}/run/min; CPU {100 * ex.steady_cpu_share:.1f}%"
        )

        def pod_added(pod: str) -> Callable[[], bool]:
            return lambda: (s := watcher.get(pod)) is not None and s.added is not None

        def pod_deleting(pod: str) -> Callable[[], bool]:
            return lambda: (s := watcher.get(pod)) is not None and s.deleting is not None

        # Interruptions under load: delete a pod, time until its replacement exists.
        for name in names[: args.interruptions]:
            t = time.monotonic()
            finish(core.delete_namespaced_pod(f"{name}-0", NAMESPACE, _preload_content=False))
            try:
                wait_until(
                    pod_added(f"{name}-1"),
                    60,
                    f"{name}-1",
                    interval=0.02,
                )
                seen = watcher.get(f"{name}-1")
                assert seen is not None and seen.added is not None
                ex.interrupt_samples.append(seen.added - t)
            except PhaseTimeout as exc:
                errors.append(str(exc))
            time.sleep(0.5)
        if ex.interrupt_samples:
            ex.interrupt_p50 = pct(ex.interrupt_samples, 0.5)
            ex.interrupt_max = max(ex.interrupt_samples)
        self.log(f"Fermata interruption → new pod: p50 {ex.interrupt_p50:.2f}s max {ex.interrupt_max:.2f}s")

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
                GROUP, VERSION, NAMESPACE, PLURAL, training_run(name, spec)
            )
        budget_seconds = args.probe_budget_usd / rate
        for name in probes:
            try:
                wait_until(
                    pod_deleting(f"{name}-0"),
                    budget_seconds + 60,
                    f"{name} stopped",
                    interval=0.02,
                )
            except PhaseTimeout as exc:
                errors.append(str(exc))
                continue
            seen = watcher.get(f"{name}-0")
            assert seen is not None and seen.deleting is not None
            if seen.start_time is None:
                errors.append(f"{name}-0: no startTime seen")
                continue
            start = datetime.fromisoformat(seen.start_time)
            # monotonic ↔ wall clock: both on this machine.
            crossing_wall = start.timestamp() + budget_seconds
            deleting_wall = time.time() - (time.monotonic() - seen.deleting)
            ex.overshoot_s.append(deleting_wall - crossing_wall)

        def segments_closed(name: str) -> Callable[[], bool]:
            return lambda: _segments_closed(name)

        def _segments_closed(name: str) -> bool:
            status = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name).get(
                "status"
            )
            segments = ((status or {}).get("cost") or {}).get("segments") or []
            return bool(segments) and all(s.get("end") for s in segments)

        for name in probes:
            try:
                wait_until(segments_closed(name), 30, f"{name} segment closed")
                status = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)[
                    "status"
                ]
                accrued = float(status["cost"]["accruedUSD"])
                ex.overshoot_billed_s.append((accrued - args.probe_budget_usd) / rate)
            except PhaseTimeout as exc:
                errors.append(str(exc))
        self.log(
            f"Fermata budget crossing → pod deletion: {[round(x, 2) for x in ex.overshoot_s]}s; "
            f"billed past budget: {[round(x, 2) for x in ex.overshoot_billed_s]}s"
        )
        ex.peak_rss_end_mib = proc_peak_rss_mib(op_pid)
        ex.rss_end_mib = proc_rss_mib(op_pid)
        return ex

    def _shape_check(self) -> None:
        fermata = self.res.columns.get("fermata")
        if fermata is None or not fermata.shape:
            return
        for col, cr in self.res.columns.items():
            if col == "fermata" or not cr.shape:
                continue
            cr.shape_matches_fermata = cr.shape == fermata.shape
            if not cr.shape_matches_fermata:
                diff = {
                    k: (cr.shape.get(k), fermata.shape.get(k))
                    for k in cr.shape
                    if cr.shape.get(k) != fermata.shape.get(k)
                }
                self.log(
                    f"WARNING {TITLES[col]}: pod scheduling shape differs from Fermata's trainer pod: {diff}"
                )


# ----------------------------------------------------------------------------- report

FIGURES: list[tuple[str, str, str]] = [
    ("all_pods_s", "all pods (s)", ".1f"),
    ("latency_p50", "create→pod p50 (s)", ".2f"),
    ("latency_p95", "p95 (s)", ".2f"),
    ("latency_max", "max (s)", ".2f"),
    ("all_running_s", "all Running (s)", ".1f"),
    ("req_per_object", "requests / object", ".2f"),
    ("controller_cpu_running_s", "controller CPU (s)", ".1f"),
    ("controller_peak_rss_mib", "controller peak RSS (MiB)", ".0f"),
]


def spread(values: Sequence[float], spec: str) -> str:
    """median [min–max] of the finite values ("—" when none; the value alone when one)."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return "—"
    med, lo, hi = statistics.median(vals), min(vals), max(vals)
    if len(vals) == 1 or f"{lo:{spec}}" == f"{hi:{spec}}":
        return f"{med:{spec}}"
    return f"{med:{spec}} [{lo:{spec}}–{hi:{spec}}]"


def cluster_label(c: ClusterResult) -> str:
    text = f"{c.gpu_nodes + c.cpu_nodes} nodes"
    if c.cpu_nodes:
        text += f" ({c.cpu_nodes} CPU)"
    if c.unrelated_pods:
        text += f" + {c.unrelated_pods} pods"
    return text


def groups(results: list[ClusterResult]) -> dict[tuple[int, str], list[ClusterResult]]:
    out: dict[tuple[int, str], list[ClusterResult]] = {}
    for c in results:
        out.setdefault((c.n, c.scenario), []).append(c)
    return out


def markdown(results: list[ClusterResult], columns: list[str], scenarios: list[Scenario]) -> str:
    reps = max((c.rep + 1 for c in results), default=0)
    lines = [
        f"Median [min–max] over {reps} repetition{'s' if reps != 1 else ''} (a fresh control plane each).",
        "",
        "| N | cluster | column | " + " | ".join(t for _, t, _ in FIGURES) + " |",
        "|---|---|---|" + "---|" * len(FIGURES),
    ]
    for (n, _), cs in groups(results).items():
        for col in columns:
            rs = [c.columns[col] for c in cs if col in c.columns]
            if not rs:
                continue
            cells = []
            for key, _, spec in FIGURES:
                if col == "direct" and key.startswith("controller_"):
                    cells.append("— (the benchmark)")
                    continue
                cells.append(spread([getattr(r, key) for r in rs], spec))
            lines.append(f"| {n} | {cluster_label(cs[0])} | {TITLES[col]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "all pods: first create → a watch has seen every object's pod; create→pod per object (for direct "
        "pods the create request itself). all Running: every pod Running and every object reporting it "
        "(Job `status.ready`, TrainingRun `status.phase`). Requests: the API server's audit log, first "
        "create → all Running, by user agent: the benchmark's create client (direct), the job controller's "
        "client (Jobs; not the shared informers' list/watch), the operator's (`fermata-operator/*`, `kopf/*`). "
        "Controller CPU and peak RSS: for Jobs the whole kube-controller-manager process, which also runs the "
        "garbage collector, namespace, service-account and root-CA publisher controllers (peak RSS reset at "
        "the column's start); for Fermata the operator process (started just before its column; peak "
        "includes start-up).",
    ]
    ratio_lines = ratios_table(results, columns)
    if ratio_lines:
        lines += ["", *ratio_lines]
    sens = sensitivity_table(results, columns, scenarios)
    if sens:
        lines += ["", *sens]
    extras = extras_table(results)
    if extras:
        lines += ["", *extras]
    return "\n".join(lines)


RATIO_FIGURES = [
    ("all_pods_s", "all pods"),
    ("latency_p95", "create→pod p95"),
    ("all_running_s", "all Running"),
]


def ratios_table(results: list[ClusterResult], columns: list[str]) -> list[str]:
    if "fermata" not in columns:
        return []
    peers = [c for c in ("job-default", "job-raised", "direct") if c in columns]
    if not peers:
        return []
    lines = [
        "Ratios, computed per repetition (same control plane), then median [min–max]:",
        "",
        "| N | cluster | ratio | " + " | ".join(t for _, t in RATIO_FIGURES) + " |",
        "|---|---|---|" + "---|" * len(RATIO_FIGURES),
    ]
    for (n, _), cs in groups(results).items():
        for peer in peers:
            cells = []
            for key, _ in RATIO_FIGURES:
                vals = [
                    ratio(getattr(c.columns["fermata"], key), getattr(c.columns[peer], key))
                    for c in cs
                    if "fermata" in c.columns and peer in c.columns
                ]
                cells.append(spread(vals, ".2f"))
            lines.append(
                f"| {n} | {cluster_label(cs[0])} | Fermata / {TITLES[peer]} | " + " | ".join(cells) + " |"
            )
    return lines


def sensitivity_table(
    results: list[ClusterResult], columns: list[str], scenarios: list[Scenario]
) -> list[str]:
    if len(scenarios) != 2:
        return []
    clean, big = scenarios[0].name, scenarios[1].name
    lines = [
        f"Cluster-size sensitivity: {big} / {clean}, per repetition, then median [min–max] "
        "(the direct column's ratio is what the bigger cluster costs the control plane and the simulation):",
        "",
        "| N | clusters | column | " + " | ".join(t for _, t in RATIO_FIGURES) + " |",
        "|---|---|---|" + "---|" * len(RATIO_FIGURES),
    ]
    by_n: dict[int, dict[int, dict[str, ClusterResult]]] = {}
    for c in results:
        by_n.setdefault(c.n, {}).setdefault(c.rep, {})[c.scenario] = c
    for n, reps in by_n.items():
        pairs = [(r[clean], r[big]) for r in reps.values() if clean in r and big in r]
        if not pairs:
            continue
        label = f"{cluster_label(pairs[0][1])} vs {cluster_label(pairs[0][0])}"
        for col in columns:
            cells = []
            for key, _ in RATIO_FIGURES:
                vals = [
                    ratio(getattr(b.columns[col], key), getattr(a.columns[col], key))
                    for a, b in pairs
                    if col in a.columns and col in b.columns
                ]
                cells.append(spread(vals, ".2f"))
            lines.append(f"| {n} | {label} | {TITLES[col]} | " + " | ".join(cells) + " |")
        if "fermata" in columns and "direct" in columns:
            cells = []
            for key, _ in RATIO_FIGURES:
                vals = []
                for a, b in pairs:
                    if (
                        "fermata" in a.columns
                        and "fermata" in b.columns
                        and "direct" in a.columns
                        and "direct" in b.columns
                    ):
                        f = ratio(getattr(b.columns["fermata"], key), getattr(a.columns["fermata"], key))
                        d = ratio(getattr(b.columns["direct"], key), getattr(a.columns["direct"], key))
                        vals.append(ratio(f, d))
                cells.append(spread(vals, ".2f"))
            lines.append(f"| {n} | {label} | Fermata ratio ÷ limit ratio | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Set-up on the big cluster (not in any column): nodes registered "
        + ", ".join(
            f"N={n}: {spread([c.nodes_registered_s for c in cs], '.0f')} s"
            for (n, s), cs in groups(results).items()
            if s == big
        )
        + "; unrelated pods Running "
        + ", ".join(
            f"N={n}: {spread([c.unrelated_running_s for c in cs], '.0f')} s"
            for (n, s), cs in groups(results).items()
            if s == big
        )
        + "."
    )
    return lines


def extras_table(results: list[ClusterResult]) -> list[str]:
    rows: list[tuple[str, Callable[[FermataExtras], float], str]] = [
        ("steady API requests / run / min", lambda e: e.req_per_run_min, ".3f"),
        ("operator CPU at steady state (% of a core)", lambda e: 100 * e.steady_cpu_share, ".1f"),
        ("API server CPU at steady state (% of a core)", lambda e: 100 * e.apiserver_cpu_steady_share, ".1f"),
        ("interruption → new pod p50 (s)", lambda e: e.interrupt_p50, ".2f"),
        ("interruption → new pod max (s)", lambda e: e.interrupt_max, ".2f"),
        (
            "budget crossing → pod deleted, worst probe (s)",
            lambda e: max(e.overshoot_s, default=math.nan),
            ".2f",
        ),
        ("billed past budget, worst probe (s)", lambda e: max(e.overshoot_billed_s, default=math.nan), ".1f"),
        ("operator peak RSS at the end (MiB)", lambda e: e.peak_rss_end_mib, ".0f"),
    ]
    grouped: list[tuple[int, str, list[FermataExtras]]] = []
    for (n, s), cs in groups(results).items():
        es = [e for c in cs if "fermata" in c.columns and (e := c.columns["fermata"].extras) is not None]
        if es:
            grouped.append((n, s, es))
    if not grouped:
        return []
    head = " | ".join(f"N = {n}" + (f" ({s})" if s != "cluster" else "") for n, s, _ in grouped)
    lines = ["Fermata's extra phases:", "", f"| | {head} |", "|---|" + "---|" * len(grouped)]
    for label, fn, spec in rows:
        lines.append(
            f"| {label} | " + " | ".join(spread([fn(e) for e in es], spec) for _, _, es in grouped) + " |"
        )
    return lines


def jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runs", type=int, nargs="+", default=[100, 300, 1000], help="N, one or more (default 100 300 1000)"
    )
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions per N, each on a fresh control plane (default 3)"
    )
    p.add_argument(
        "--columns",
        nargs="+",
        choices=COLUMNS,
        help=f"columns to run, always in the order {' '.join(COLUMNS)} (default: all; with --sensitivity: direct fermata)",
    )
    p.add_argument(
        "--fermata-extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after Fermata's column: steady-state window, interruptions, budget probes (default: on, off with --sensitivity)",
    )
    p.add_argument(
        "--no-extras", dest="fermata_extras", action="store_false", default=None, help="= --no-fermata-extras"
    )
    p.add_argument(
        "--raised-cm-args",
        default="--kube-api-qps=1000 --kube-api-burst=2000",
        help="kube-controller-manager flags of the 'Job (raised QPS)' column",
    )
    p.add_argument(
        "--extra-nodes-factor", type=float, default=1.0, help="F: F*N + spare nodes, (F-1)*N of them CPU-only"
    )
    p.add_argument(
        "--unrelated-pods", default="0", help="M unrelated CPU pods on the extra nodes (a number, or e.g. 2N)"
    )
    p.add_argument(
        "--sensitivity",
        action="store_true",
        help="per N and rep: a clean and a big cluster, big/clean ratios",
    )
    p.add_argument(
        "--sensitivity-factor",
        type=float,
        default=3.0,
        help="the big cluster's --extra-nodes-factor (default 3)",
    )
    p.add_argument(
        "--sensitivity-unrelated", default="2N", help="the big cluster's --unrelated-pods (default 2N)"
    )
    p.add_argument("--nodes-per-kubelet", type=int, default=500)
    p.add_argument("--node-status-seconds", type=float, default=300.0)
    p.add_argument("--spare-nodes", type=int, default=8)
    p.add_argument("--resync", type=float, default=60.0, help="FERMATA_RESYNC_SECONDS of the operator")
    p.add_argument("--create-threads", type=int, default=8)
    p.add_argument("--between-settle", type=float, default=5.0, help="seconds of quiet before each column")
    p.add_argument("--settle", type=float, default=20.0, help="seconds after all Running before the window")
    p.add_argument("--window", type=float, default=120.0, help="steady-state window, seconds")
    p.add_argument("--interruptions", type=int, default=5)
    p.add_argument("--budget-probes", type=int, default=3)
    p.add_argument("--probe-budget-usd", type=float, default=2.0)
    p.add_argument("--probe-hourly-usd", type=float, default=720.0)
    p.add_argument(
        "--phase-timeout", type=float, default=300.0, help="limit of every phase, seconds (default 300)"
    )
    p.add_argument(
        "--operator-src",
        default=str(ROOT / "operator"),
        help="the operator package's parent folder (e.g. a git worktree of another commit, to compare)",
    )
    p.add_argument(
        "--no-audit", action="store_true", help="no audit log (no request counts; its overhead gone)"
    )
    p.add_argument(
        "--apiserver-pprof",
        type=Path,
        help="write a CPU profile of the API server per column here (its first --pprof-seconds)",
    )
    p.add_argument("--pprof-seconds", type=float, default=15.0)
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--keep", type=Path, help="keep the work directory (logs, audit) here")
    args = p.parse_args(argv)

    columns = [
        c for c in COLUMNS if c in (args.columns or (["direct", "fermata"] if args.sensitivity else COLUMNS))
    ]
    if args.fermata_extras is None:
        args.fermata_extras = not args.sensitivity
    if args.sensitivity:
        scenarios = [
            Scenario("clean", 1.0, "0"),
            Scenario("big", args.sensitivity_factor, args.sensitivity_unrelated),
        ]
    else:
        scenarios = [Scenario("cluster", args.extra_nodes_factor, args.unrelated_pods)]
    for sc in scenarios:
        if sc.factor < 1.0:
            p.error("the extra-nodes factor must be >= 1")
        for n in args.runs:
            try:
                m = sc.unrelated_pods(n)
            except ValueError:
                p.error(f"unrelated pods: {sc.unrelated!r} is neither a number nor kN")
            if m and not sc.cpu_nodes(n):
                p.error("unrelated pods need extra nodes (--extra-nodes-factor / --sensitivity-factor > 1)")

    binary = ensure_built()
    workroot = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fermata-scale-"))
    workroot.mkdir(parents=True, exist_ok=True)
    results: list[ClusterResult] = []
    failed = False
    started = time.monotonic()
    print(
        f"columns: {', '.join(TITLES[c] for c in columns)}; N = {args.runs}; {args.reps} rep(s); "
        f"clusters: {', '.join(f'{s.name} (F={s.factor:g}, unrelated {s.unrelated})' for s in scenarios)}; "
        f"Fermata extras {'on' if args.fermata_extras else 'off'}",
        flush=True,
    )
    try:
        for n in args.runs:
            for rep in range(args.reps):
                for sc in scenarios:
                    bench = Bench(n, rep, sc, columns, args, workroot / f"n{n}-rep{rep + 1}-{sc.name}")
                    print(f"N = {n}, repetition {rep + 1}/{args.reps}, cluster {sc.name}", flush=True)
                    r = bench.run(binary)
                    results.append(r)
                    for e in r.all_errors():
                        print(f"  {bench.tag} ERROR {e}", flush=True)
                    failed |= bool(r.all_errors())
                    print(f"  {bench.tag} done in {r.wall_s:.0f}s", flush=True)
    except KeyboardInterrupt:
        failed = True
        print("interrupted: reporting what was measured", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
        print()
        print(markdown(results, columns, scenarios))
        print(f"\nwall time {time.monotonic() - started:.0f}s", flush=True)
        if args.json:
            doc = {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "columns": columns,
                "machine_cores": os.cpu_count(),
                "results": [asdict(r) for r in results],
            }
            args.json.write_text(json.dumps(jsonable(doc), indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
