"""What one write costs the API server: a TrainingRun's against a Job's and a Pod's.

``operator_scale.py`` finds the runs CPU-bound on the API server, which spends several times
more CPU per TrainingRun than per Job. This benchmark takes that apart per request. On a fresh
local control plane (the real kube-apiserver + etcd of ``tests/cluster``, audit log off,
controller-manager with only the service-account controllers, the scheduler idle: every pod is
bound to a node that does not exist, so nothing else writes) it sends, for each kind, the writes
one object gets until it is Running, ``N`` objects at a time from ``--threads`` client threads,
and reads the API server process's CPU time (``utime + stime``) around each step:

* **TrainingRun** (``operator_scale``'s run spec): the create; kopf's finalizer (one patch of
  ``metadata.finalizers``; kopf sends it as a JSON patch, here a merge patch); the operator's three status writes until Running,
  each the JSON merge patch the controller sends (``planner.merge_patch``) of the status the
  real planner plans: pod created, pod placed (``ContainerCreating``), pod Running;
* **TrainingRun, no CEL**: the same with a copy of the CRD without its
  ``x-kubernetes-validations`` (what the 84 CEL rules cost);
* **TrainingRun, no schema**: the same with ``spec`` and ``status`` left unstructured
  (``x-kubernetes-preserve-unknown-fields``, no CEL, no defaults), the run created with the spec
  as the first control plane defaulted it (the same object, byte for byte): what a custom
  resource costs at all, without the schema's defaulting, pruning and validation;
* **Job** (``operator_scale``'s Job): the create and the job controller's two status writes
  (``active``/``startTime``, then ``ready``) as merge patches;
* **Pod** (the trainer pod's shape): the create (already bound) and the kubelet's status
  write (Running);
* **Event**: one create (the operator posts two per run until Running).

Each step's figure is API server CPU milliseconds per request; each is the median of ``--reps``
repetitions (a fresh control plane each) with its min-max spread. Run::

    .venv/bin/python benchmarks/apiserver_cost.py            # N = 400, 3 reps: ~4 min
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
for sub in ("operator", "dev", "benchmarks", ""):
    sys.path.insert(0, str(ROOT / sub) if sub else str(ROOT))

import operator_scale as osc  # noqa: E402
from kubernetes import client  # noqa: E402

from fermata_dev.cluster import ensure_built, wait_for_service_account  # noqa: E402
from fermata_operator.crdgen import render  # noqa: E402
from fermata_operator.planner import TRAINER_KEYS, Observed, merge_patch, plan  # noqa: E402
from fermata_operator.policies.prices import PriceTable  # noqa: E402
from fermata_operator.settings import OperatorSettings  # noqa: E402
from tests.operator.factories import T0, iso, node, pod_for, running, waiting  # noqa: E402

NS = "cost"
GROUP, VERSION, PLURAL = osc.GROUP, osc.VERSION, osc.PLURAL
KINDS = ("TrainingRun", "TrainingRun, no CEL", "TrainingRun, no schema", "Job", "Pod", "Event")


def operator_writes() -> list[dict[str, Any]]:
    """The three status merge patches the controller sends for one run until Running, planned by
    the real planner from the run, its pod (created, placed, Running) and its node."""
    run = osc.training_run("shape")
    run["metadata"].update(namespace=NS, uid="00000000-0000-0000-0000-000000000001", generation=1)
    nodes = {"spot-1": node("spot-1")}
    settings = OperatorSettings()
    bodies = []
    pod = None
    for step, at in enumerate((0, 2, 4)):
        pods: list[dict[str, Any]] = []
        if step == 1:
            pod = waiting(pod_for(run), "ContainerCreating", node_name="spot-1")
            pods = [pod]
        elif step == 2:
            assert pod is not None
            pods = [running(pod, "spot-1", T0 + timedelta(seconds=3))]
        obs = Observed(
            run=run,
            pods=pods,
            nodes=nodes,
            missing_nodes=set(),
            prices=PriceTable(),
            now=T0 + timedelta(seconds=at),
        )
        planned = plan(obs, settings)
        old = {k: v for k, v in (run.get("status") or {}).items() if k not in TRAINER_KEYS}
        bodies.append({"status": merge_patch(old, planned.status)})
        run["status"] = copy.deepcopy(planned.status)
    assert run["status"]["phase"] == "Running", run["status"].get("phase")
    return bodies


def pod_running_status() -> dict[str, Any]:
    started = iso(T0)
    return {
        "status": {
            "phase": "Running",
            "startTime": started,
            "podIP": "10.1.0.7",
            "hostIP": "192.0.2.7",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": started}
                for t in (
                    "PodReadyToStartContainers",
                    "Initialized",
                    "Ready",
                    "ContainersReady",
                    "PodScheduled",
                )
            ],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": True,
                    "restartCount": 0,
                    "image": "ghcr.io/fermata-dev/fermata-trainer:bench",
                    "imageID": "ghcr.io/fermata-dev/fermata-trainer@sha256:" + "0" * 64,
                    "containerID": "containerd://" + "1" * 64,
                    "started": True,
                    "state": {"running": {"startedAt": started}},
                }
            ],
        }
    }


class Measure:
    """One fresh control plane: every kind's steps, N objects each."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.results: dict[str, dict[str, float]] = {}
        #: A run's spec as the API server defaulted it (read back from the first control plane).
        self.defaulted_spec: dict[str, Any] | None = None

    def run(self, binary: Path) -> dict[str, dict[str, float]]:
        crd = self.work / "crd.yaml"
        crd.write_text(render())
        self._kinds(binary, crd, ("TrainingRun", "Job", "Pod", "Event"), "cp")
        plain = self.work / "crd-no-cel.yaml"
        plain.write_text(
            yaml.safe_dump_all([without_cel(d) for d in yaml.safe_load_all(crd.read_text()) if d])
        )
        self._kinds(binary, plain, ("TrainingRun, no CEL",), "cp-no-cel")
        loose = self.work / "crd-no-schema.yaml"
        loose.write_text(
            yaml.safe_dump_all([without_schema(d) for d in yaml.safe_load_all(crd.read_text()) if d])
        )
        self._kinds(binary, loose, ("TrainingRun, no schema",), "cp-no-schema")
        return self.results

    def _kinds(self, binary: Path, crd: Path, kinds: tuple[str, ...], name: str) -> None:
        cp = osc.BenchControlPlane(
            self.work / name,
            binary,
            crds=[crd],
            controllers=("serviceaccount", "serviceaccount-token"),
        )
        cp.start()
        try:
            base = cp.api_client()
            base.configuration.connection_pool_maxsize = 2 * self.args.threads
            api = client.ApiClient(base.configuration)
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NS}})
            wait_for_service_account(api, NS, timeout=60)
            pid = cp.pid("apiserver")
            assert pid is not None
            for kind in kinds:
                self.results[kind] = self._steps(api, pid, kind)
        finally:
            cp.stop()

    def _steps(self, api: Any, pid: int, kind: str) -> dict[str, float]:
        n, names = self.args.n, [f"obj-{i:04d}" for i in range(self.args.n)]
        core, custom, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)
        steps: list[tuple[str, Callable[[str], Any]]] = []
        if kind.startswith("TrainingRun"):
            spec = self.defaulted_spec if kind == "TrainingRun, no schema" else None
            if kind == "TrainingRun, no schema" and spec is None:
                raise RuntimeError("no defaulted spec: the TrainingRun kind runs first")
            steps.append(
                (
                    "create",
                    lambda x: custom.create_namespaced_custom_object(
                        GROUP, VERSION, NS, PLURAL, osc.training_run(x, spec), _preload_content=False
                    ),
                )
            )
            finalizer = {"metadata": {"finalizers": ["fermata.dev/operator"]}}
            steps.append(
                (
                    "finalizer (kopf)",
                    lambda x: custom.patch_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        NS,
                        PLURAL,
                        x,
                        finalizer,
                        _preload_content=False,
                    ),
                )
            )
            for i, body in enumerate(operator_writes(), 1):
                steps.append((f"status write {i}", _status_write(custom, body)))
        elif kind == "Job":
            steps.append(
                ("create", lambda x: batch.create_namespaced_job(NS, job(x), _preload_content=False))
            )
            first = {"status": {"active": 1, "ready": 0, "startTime": iso(T0), "uncountedTerminatedPods": {}}}
            steps.append(
                (
                    "status write 1",
                    lambda x: batch.patch_namespaced_job_status(x, NS, first, _preload_content=False),
                )
            )
            second = {"status": {"ready": 1}}
            steps.append(
                (
                    "status write 2",
                    lambda x: batch.patch_namespaced_job_status(x, NS, second, _preload_content=False),
                )
            )
        elif kind == "Pod":
            steps.append(
                (
                    "create (bound)",
                    lambda x: core.create_namespaced_pod(NS, bound_pod(x), _preload_content=False),
                )
            )
            status = pod_running_status()
            steps.append(
                (
                    "status write (kubelet)",
                    lambda x: core.patch_namespaced_pod_status(x, NS, status, _preload_content=False),
                )
            )
        else:
            steps.append(
                ("create", lambda x: core.create_namespaced_event(NS, event(x), _preload_content=False))
            )
        out: dict[str, float] = {}
        for label, call in steps:
            time.sleep(self.args.settle)
            c0 = osc.proc_cpu_seconds(pid)
            with ThreadPoolExecutor(self.args.threads) as pool:
                failed = sum(not ok for ok in pool.map(lambda x, c=call: _send(c, x), names))
            if failed:
                raise RuntimeError(f"{kind} {label}: {failed} of {n} requests failed")
            out[label] = 1000.0 * (osc.proc_cpu_seconds(pid) - c0) / n
            if kind == "TrainingRun" and label == "create":
                made = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, names[0])
                self.defaulted_spec = made["spec"]
        return out


def _status_write(custom: Any, body: dict[str, Any]) -> Callable[[str], Any]:
    def send(name: str) -> Any:
        return custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, name, body, _preload_content=False
        )

    return send


def _send(call: Callable[[str], Any], name: str) -> bool:
    try:
        osc.raw_body(call(name))
        return True
    except Exception as exc:  # counted and reported by the caller
        print(f"    {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return False


def without_schema(doc: Any) -> Any:
    """The CRD with ``spec`` and ``status`` unstructured (no validation, defaults or pruning)."""
    if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
        return doc
    doc = without_cel(doc)
    for version in doc["spec"]["versions"]:
        props = version["schema"]["openAPIV3Schema"]["properties"]
        for stanza in ("spec", "status"):
            props[stanza] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        version.pop("additionalPrinterColumns", None)
    return doc


def without_cel(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: without_cel(v) for k, v in doc.items() if k != "x-kubernetes-validations"}
    if isinstance(doc, list):
        return [without_cel(v) for v in doc]
    return doc


def bound_pod(name: str) -> dict[str, Any]:
    pod: dict[str, Any] = osc.direct_pod(name, "cost")
    pod["spec"]["nodeName"] = "nowhere"  # bound: the scheduler leaves it alone
    return pod


def job(name: str) -> dict[str, Any]:
    body: dict[str, Any] = osc.job_body(name, "cost")  # no job controller here: nothing else writes it
    return body


def event(name: str) -> dict[str, Any]:
    return {
        "metadata": {"generateName": f"{name}."},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "name": name,
            "namespace": NS,
        },
        "reason": "PodCreated",
        "message": f"created pod {name}-0 on spot capacity",
        "type": "Normal",
        "source": {"component": "fermata-operator"},
        "firstTimestamp": iso(T0),
        "lastTimestamp": iso(T0),
        "count": 1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="objects per kind")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each step")
    args = p.parse_args(argv)
    binary = ensure_built()
    reps: list[dict[str, dict[str, float]]] = []
    t0 = time.monotonic()
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="fermata-apicost-") as tmp:
            reps.append(Measure(args, Path(tmp)).run(binary))
        print(f"repetition {rep + 1}/{args.reps} done ({time.monotonic() - t0:.0f}s)", flush=True)
    print()
    print(
        f"API server CPU per request (ms), N = {args.n} per kind, median [min–max] of {args.reps} (a fresh control plane each)"
    )
    print()
    print("| kind | step | API server CPU per request (ms) |")
    print("|---|---|---|")
    totals: dict[str, list[float]] = {}
    for kind in KINDS:
        for label in reps[0].get(kind, {}):
            print(f"| {kind} | {label} | {osc.spread([r[kind][label] for r in reps], '.2f')} |")
        totals[kind] = [sum(r[kind].values()) for r in reps]
    print()
    print("| kind | all its steps (ms per object) | ÷ Job |")
    print("|---|---|---|")
    for kind in KINDS:
        ratio = [t / j for t, j in zip(totals[kind], totals["Job"], strict=True)]
        print(f"| {kind} | {osc.spread(totals[kind], '.2f')} | {osc.spread(ratio, '.2f')} |")
    print(f"\nwall time {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
