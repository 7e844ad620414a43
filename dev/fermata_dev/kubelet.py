"""A test kubelet: plays GPU nodes for a :class:`~fermata_dev.cluster.LocalControlPlane`.

There is no container runtime. :class:`LocalKubelet` registers Node objects (labels, taints and
``nvidia.com/gpu`` capacity of real EKS/Karpenter GPU nodes), keeps them Ready (node status
heartbeats and a Lease in ``kube-node-lease``), watches the pods the real scheduler binds to
them and drives those pods through their lifecycle according to a mode:

``auto`` (default)
    a bound pod goes Pending -> Running at once (conditions, container statuses, pod IP).
``manual``
    pods stay as they are until the test calls :meth:`LocalKubelet.set_running`,
    :meth:`~LocalKubelet.set_succeeded`, :meth:`~LocalKubelet.set_failed`,
    :meth:`~LocalKubelet.add_disruption_target` or :meth:`~LocalKubelet.evict`.
``exec``
    the pod's first container runs as a local subprocess (``command`` + ``args``, ``$(VAR)``
    expanded); the pod is Running while it runs and ends Succeeded/Failed with the real exit
    code (a signal N gives 128+N) in ``containerStatuses[0].state.terminated``.

The mode is set per kubelet; the pod annotation ``kubelet.fermata.dev/mode`` overrides it.
A pod whose container names an image in :attr:`LocalKubelet.images` (built by ``make images``,
see :mod:`fermata_dev.images`) runs from that image in ``auto`` and ``exec`` mode: image mode.

Image mode (what the container sees)
------------------------------------
What a container runtime gives it (:mod:`fermata_dev.podexec`): the image's root file system as
``/`` (an overlay: the image is never written; read-only with ``readOnlyRootFilesystem``), the
pod's volumes bind-mounted at their ``mountPath`` (``readOnly`` honoured, ``subPath``), the
image's ``ENV`` under the pod's ``env``/``envFrom``, ``command``/``args`` over the image's
ENTRYPOINT/CMD by Kubernetes' rule, ``runAsUser``/``runAsGroup`` else the image's ``USER``,
``workingDir`` else the image's, a ``/proc``, a minimal ``/dev`` and the node's ``/etc/hosts``. The
identity is in-cluster: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service-account token, CA and
namespace the API server's ServiceAccount admission put in the pod's ``kube-api-access`` volume
(the controller-manager publishes ``kube-root-ca.crt``). Each pod has a network namespace of its
own (unless ``hostNetwork``) in which the API server's port and :attr:`LocalKubelet.forward_ports`
answer on ``127.0.0.1`` through a relay to the node's loopback. Nothing is remapped: no path the
program sees differs from the path in the pod spec.

Exec mode contract (what the program sees)
------------------------------------------
* **File system rule.** The program runs on the host's file system; only the pod's volumes
  move. Every pod gets a private root directory ``R``
  (``<workdir>/pods/<ns>_<name>_<uid8>/root``), and each ``volumeMount`` with ``mountPath: /p``
  is materialised at ``R/p`` (a symlink to the volume's directory, or to ``subPath`` inside it).
  The kubelet rewrites the pod's own environment values (``env`` and ``envFrom``; not the host
  variables passed through) that are absolute paths at or below a ``mountPath``: with
  ``/etc/fermata`` and ``/tmp`` mounted, ``FERMATA_CONFIG=/etc/fermata/trainer.json`` becomes
  ``R/etc/fermata/trainer.json`` and ``HOME=/tmp`` becomes ``R/tmp`` (the emptyDir).
  ``$(VAR)`` in ``command``/``args`` expands to the rewritten values; literal arguments are left
  alone. ``workingDir`` is mapped the same way (one outside every mount is used as it is when
  the host has it, else created below ``R``); the default working directory is ``R``. Every
  other path (an argument, a path inside a mounted file, an environment value outside every
  mount such as a dataset under the checkout) is the host's, as if the image's file system were
  the host's. The program needs to know nothing of this: the remapping is harness logic.
  Volumes: ``configMap``, ``secret``, ``downwardAPI``, ``projected`` (including
  ``serviceAccountToken``), ``emptyDir`` (a fresh directory), ``persistentVolumeClaim``
  (``<workdir>/pvcs/<ns>/<claim>``, kept across pods so checkpoints survive a pod being
  replaced) and ``hostPath`` (the real host path). A missing non-optional ConfigMap/Secret
  keeps the pod Pending and is retried, as a kubelet does.
* **Environment.** ``env`` (``value`` and ``valueFrom`` ``fieldRef`` / ``configMapKeyRef`` /
  ``secretKeyRef``; ``resourceFieldRef`` gives the quantity as written) and ``envFrom``, on top
  of a small host environment (``PATH``, ``HOME``, ``LANG``, ... see ``passthrough_env``) and
  ``extra_env``. ``HOSTNAME`` is the pod name.
* **Identity.** ``KUBECONFIG`` points at a kubeconfig holding a token made with the TokenRequest
  API for the pod's ``serviceAccountName``, bound to the pod: the program acts with its own RBAC
  and loses access when the pod is deleted. ``KUBERNETES_SERVICE_HOST`` is *not* set.
* **Executable.** ``command[0]`` is looked up in the ``executables`` mapping, then used as a path
  if absolute, then searched on ``PATH``.
* **Logs.** stdout and stderr go to one file per pod: :meth:`LocalKubelet.logs`.

Deletion is handled like a kubelet: when a pod on our nodes gets a ``deletionTimestamp`` its
process group gets SIGTERM, then SIGKILL after the grace period; the final status is written
and the pod is deleted with ``gracePeriodSeconds=0`` and a uid precondition (it then stays until
its finalizers are removed). auto/manual pods "exit" on SIGTERM at once: Running ones end Failed
with exit code 143, never-started ones with 137/``ContainerStatusUnknown``. Pods on a node
removed with :meth:`LocalKubelet.delete_node` are failed with ``DisruptionTarget``
(``DeletionByPodGC``) and deleted, as the pod garbage collector does.

Run standalone with ``python -m fermata_dev.kubelet --kubeconfig K [--nodes N.yaml]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import posixpath
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, cast
from urllib.parse import urlsplit

import structlog
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fermata_dev.images import Image
from fermata_dev.podexec import ContainerSpec, Mount

log = structlog.get_logger("fermata_dev.kubelet")

Mode = Literal["auto", "manual", "exec"]
MODES: tuple[Mode, ...] = ("auto", "manual", "exec")
MODE_ANNOTATION = "kubelet.fermata.dev/mode"
NODE_LEASE_NAMESPACE = "kube-node-lease"
NODE_IP = "127.0.0.1"
POD_IP = "127.0.0.1"
KUBELET_VERSION = "v1.35.4-fermata"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
DEFAULT_PASSTHROUGH_ENV: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
)

JSON = dict[str, Any]


# -- node description ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def to_api(self) -> JSON:
        body: JSON = {"key": self.key, "effect": self.effect}
        if self.value:
            body["value"] = self.value
        return body


SPOT_TAINT = Taint("karpenter.sh/capacity-type", "spot", "NoSchedule")
"""Carried by the default spot nodes: Fermata's training pods must tolerate it."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    instance_type: str = "g4dn.xlarge"
    capacity_type: Literal["spot", "on-demand"] = "on-demand"
    zone: str = "us-east-1a"
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    pods: int = 110
    ephemeral_storage: str = "100Gi"
    taints: tuple[Taint, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def node_labels(self) -> dict[str, str]:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": self.instance_type,
            "topology.kubernetes.io/zone": self.zone,
            "topology.kubernetes.io/region": self.zone.rstrip("abcdefghijklmnopqrstuvwxyz"),
            "karpenter.sh/capacity-type": self.capacity_type,
            "eks.amazonaws.com/capacityType": "SPOT" if self.capacity_type == "spot" else "ON_DEMAND",
        }
        if self.gpus > 0:
            labels["nvidia.com/gpu.present"] = "true"
        labels.update(self.labels)
        return labels

    def resources(self) -> dict[str, str]:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": self.ephemeral_storage,
            "nvidia.com/gpu": str(self.gpus),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeSpec:
        """From YAML: ``name``, ``instanceType``, ``capacityType`` (spot|on-demand), ``zone``,
        ``gpus``, ``cpu``, ``memory``, ``pods``, ``taints`` ([{key, value, effect}]), ``labels``.
        Spot nodes get :data:`SPOT_TAINT` unless ``taints`` is given."""
        capacity_type = str(data.get("capacityType", "on-demand"))
        if capacity_type not in ("spot", "on-demand"):
            raise ValueError(f"node {data.get('name')}: capacityType must be spot or on-demand")
        if "taints" in data:
            taints = tuple(
                Taint(str(t["key"]), str(t.get("value", "")), str(t.get("effect", "NoSchedule")))
                for t in data.get("taints") or []
            )
        else:
            taints = (SPOT_TAINT,) if capacity_type == "spot" else ()
        return cls(
            name=str(data["name"]),
            instance_type=str(data.get("instanceType", "g4dn.xlarge")),
            capacity_type=cast(Literal["spot", "on-demand"], capacity_type),
            zone=str(data.get("zone", "us-east-1a")),
            gpus=int(data.get("gpus", 1)),
            cpu=str(data.get("cpu", "4")),
            memory=str(data.get("memory", "16Gi")),
            pods=int(data.get("pods", 110)),
            taints=taints,
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        )


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("spot-1", "g4dn.xlarge", "spot", "us-east-1a", taints=(SPOT_TAINT,)),
    NodeSpec("spot-2", "g4dn.xlarge", "spot", "us-east-1b", taints=(SPOT_TAINT,)),
    NodeSpec("od-1", "g4dn.xlarge", "on-demand", "us-east-1a"),
    NodeSpec("od-2", "g5.xlarge", "on-demand", "us-east-1b"),
)


def load_nodes(path: Path) -> list[NodeSpec]:
    """Nodes from a YAML file: a list of node mappings, or a mapping with a ``nodes`` list."""
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, Mapping):
        data = data.get("nodes")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of nodes")
    return [NodeSpec.from_dict(item) for item in data]


# -- helpers -------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _body(resp: Any) -> JSON:
    """JSON body of a ``_preload_content=False`` response."""
    try:
        return cast(JSON, json.loads(resp.data))
    finally:
        resp.release_conn()


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are replaced, ``$$`` gives ``$``."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(repl, text)


def map_mounted_path(path: str, mount_paths: Iterable[str], rootfs: Path) -> Path | None:
    """Where the in-pod absolute ``path`` is on the host if it lies at or below one of
    ``mount_paths`` (its place under the pod root ``rootfs``); ``None`` if it is under none."""
    if not path.startswith("/"):
        return None
    normalized = posixpath.normpath(path)
    for mount_path in mount_paths:
        mount = posixpath.normpath(mount_path).rstrip("/")
        if normalized == mount or normalized.startswith(mount + "/"):
            return rootfs / normalized.lstrip("/")
    return None


def _security(pod: JSON, container: JSON) -> JSON:
    """The container's security context over the pod's (the fields both can set)."""
    pod_level = (pod.get("spec") or {}).get("securityContext") or {}
    return {**pod_level, **(container.get("securityContext") or {})}


def spec_of(pod: JSON) -> JSON:
    return cast(JSON, pod.get("spec") or {})


def _fs_groups(pod: JSON) -> list[int]:
    ctx = (pod.get("spec") or {}).get("securityContext") or {}
    groups = [int(g) for g in ctx.get("supplementalGroups") or []]
    if ctx.get("fsGroup") is not None:
        groups.append(int(ctx["fsGroup"]))
    return groups


def run_as(pod: JSON, container: JSON, image: Image) -> tuple[int, int]:
    """uid and gid: ``runAsUser`` / ``runAsGroup`` (container over pod), else the image's USER."""
    ctx = _security(pod, container)
    image_uid, image_gid = image.uid_gid()
    uid = int(ctx["runAsUser"]) if ctx.get("runAsUser") is not None else image_uid
    gid = int(ctx["runAsGroup"]) if ctx.get("runAsGroup") is not None else image_gid
    return uid, gid


def image_argv(container: JSON, image: Image, env: Mapping[str, str]) -> list[str]:
    """Kubernetes' rule: ``command`` replaces the ENTRYPOINT (and drops CMD), ``args`` replace
    CMD; ``$(VAR)`` expands in both."""
    command, args = container.get("command"), container.get("args")
    if command:
        argv = [*command, *(args or [])]
    else:
        argv = [*image.entrypoint, *(args if args is not None else image.cmd)]
    return [expand(str(part), env) for part in argv]


def image_mounts(container: JSON, volumes: Mapping[str, Path]) -> list[Mount]:
    """The container's ``volumeMounts`` as (node source, container path, read-only)."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            continue
        source = volume
        if mount.get("subPath"):
            source = volume / mount["subPath"]
            if not source.exists():
                source.mkdir(parents=True)
        mounts.append(Mount(str(source), str(mount["mountPath"]), bool(mount.get("readOnly"))))
    return mounts


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _NotReady(Exception):
    """A pod cannot start yet (e.g. a referenced ConfigMap does not exist): retry later."""


@dataclass
class _PodRuntime:
    uid: str
    namespace: str
    name: str
    root: Path
    log_path: Path
    started_at: str
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    deleting: bool = False
    exit_code: int | None = None
    done: threading.Event = field(default_factory=threading.Event)


# -- the kubelet ---------------------------------------------------------------------------------


class LocalKubelet:
    """Plays a set of nodes against a real API server. Thread-based; ``start()`` / ``stop()``."""

    def __init__(
        self,
        kubeconfig: Path,
        nodes: Sequence[NodeSpec] = DEFAULT_NODES,
        *,
        mode: Mode = "auto",
        workdir: Path | None = None,
        executables: Mapping[str, str] | None = None,
        images: Mapping[str, Image] | None = None,
        extra_env: Mapping[str, str] | None = None,
        passthrough_env: Sequence[str] = DEFAULT_PASSTHROUGH_ENV,
        heartbeat_interval: float = 10.0,
        token_expiration_seconds: int = 86400,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.kubeconfig = Path(kubeconfig)
        self.mode: Mode = mode
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fermata-kubelet-")).resolve()
        self.executables = dict(executables or {})
        #: Image name → built image (:func:`fermata_dev.images.load_index`): an exec-mode pod
        #: whose container names one of these runs from the image's root file system.
        self.images: dict[str, Image] = dict(images or {})
        #: Node loopback ports an image-mode pod reaches from its own network namespace (the
        #: API server's port always): an S3 server on loopback, for instance.
        self.forward_ports: set[int] = set()
        #: Node directories every image-mode container sees at the same path (local mode's
        #: stand-in for a node-local disk: the demo's dataset and checkpoint directories).
        self.node_mounts: list[Path] = []
        self.extra_env = dict(extra_env or {})
        self.passthrough_env = tuple(passthrough_env)
        self.heartbeat_interval = heartbeat_interval
        self.token_expiration_seconds = token_expiration_seconds

        self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._core = client.CoreV1Api(self._api)
        self._coordination = client.CoordinationV1Api(self._api)
        self._cluster_entry = self._read_cluster_entry()

        self._lock = threading.RLock()
        self._nodes: dict[str, NodeSpec] = {}
        self._node_since: dict[str, str] = {}
        self._removed_nodes: set[str] = set()
        self._initial_nodes = list(nodes)
        self._pods: dict[tuple[str, str], JSON] = {}
        self._runtimes: dict[str, _PodRuntime] = {}
        self._logs: dict[tuple[str, str], Path] = {}
        self._deletions: set[str] = set()  # pods whose process got SIGTERM
        self._force_deleted: set[str] = set()  # pods deleted with grace 0 (finalizers may hold)
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_resp: Any = None
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Register the nodes, start the watch/worker/heartbeat threads, wait for the first list."""
        if self._started:
            raise RuntimeError("kubelet already started")
        self._started = True
        self._stop.clear()
        for spec in self._initial_nodes:
            self.add_node(spec)
        for target, name in (
            (self._watch_loop, "kubelet-watch"),
            (self._work_loop, "kubelet-worker"),
            (self._heartbeat_loop, "kubelet-heartbeat"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._synced.wait(timeout):
            raise TimeoutError("kubelet: initial pod list did not complete")
        log.info("kubelet.started", nodes=sorted(self._nodes), mode=self.mode)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads and kill every local process; idempotent."""
        if not self._started:
            return
        self._stop.set()
        resp = self._watch_resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()
        self._queue.put(None)
        with self._lock:
            runtimes = list(self._runtimes.values())
        for rt in runtimes:
            self._signal(rt, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for rt in runtimes:
            if rt.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rt.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._signal(rt, signal.SIGKILL)
            if rt.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rt.process.wait(timeout=5)
            if rt.log_file is not None:
                rt.log_file.close()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        self._api.close()
        self._started = False
        log.info("kubelet.stopped")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def set_mode(self, mode: Mode) -> None:
        """Change the mode for pods handled from now on."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode

    # -- nodes ------------------------------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes)

    def add_node(self, spec: NodeSpec) -> None:
        """Register (or re-register) a node and keep it Ready."""
        with self._lock:
            self._nodes[spec.name] = spec
            self._removed_nodes.discard(spec.name)
            self._node_since.setdefault(spec.name, _now())
        self._register(spec)

    def delete_node(self, name: str) -> None:
        """The node disappears (spot reclaim): stop heartbeats, delete the Node and its Lease,
        then fail and delete its pods as the pod garbage collector does."""
        with self._lock:
            self._nodes.pop(name, None)
            self._node_since.pop(name, None)
            self._removed_nodes.add(name)
        with contextlib.suppress(ApiException):
            self._core.delete_node(name)
        with contextlib.suppress(ApiException):
            self._coordination.delete_namespaced_lease(name, NODE_LEASE_NAMESPACE)
        pods = _body(
            self._core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={name}", _preload_content=False
            )
        )
        for pod in pods.get("items") or []:
            self._gc_pod(pod)
        log.info("node.deleted", node=name)

    def taint_node(self, name: str, key: str, value: str = "", effect: str = "NoSchedule") -> None:
        """Add (or replace, same key and effect) a taint on a node."""
        node = _body(self._core.read_node(name, _preload_content=False))
        taints = [
            t
            for t in node.get("spec", {}).get("taints") or []
            if not (t.get("key") == key and t.get("effect") == effect)
        ]
        taints.append(Taint(key, value, effect).to_api())
        self._core.patch_node(name, {"spec": {"taints": taints}})
        log.info("node.tainted", node=name, key=key, value=value, effect=effect)

    def untaint_node(self, name: str, key: str, effect: str | None = None) -> None:
        node = _body(self._core.read_node(name, _preload_content=False))
        taints = [
            t
            for t in node.get("spec", {}).get("taints") or []
            if not (t.get("key") == key and (effect is None or t.get("effect") == effect))
        ]
        self._core.patch_node(name, {"spec": {"taints": taints}})

    def _register(self, spec: NodeSpec) -> None:
        digest = hashlib.sha256(spec.name.encode()).hexdigest()[:17]
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": spec.name, "labels": spec.node_labels()},
            "spec": {
                "providerID": f"aws:///{spec.zone}/i-{digest}",
                "taints": [t.to_api() for t in spec.taints],
            },
        }
        try:
            self._core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        # The TaintNodesByCondition admission plugin adds node.kubernetes.io/not-ready to new
        # nodes; the node lifecycle controller (not run here) would lift it once Ready.
        self._core.patch_node(
            spec.name,
            {
                "metadata": {"labels": spec.node_labels()},
                "spec": {"taints": [t.to_api() for t in spec.taints], "unschedulable": False},
            },
        )
        self._heartbeat(spec)

    def _node_status(self, spec: NodeSpec) -> JSON:
        now = _now()
        since = self._node_since.get(spec.name, now)

        def condition(kind: str, status: str, reason: str, message: str) -> JSON:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": since,
            }

        resources = spec.resources()
        return {
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                    condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                ],
                "addresses": [
                    {"type": "InternalIP", "address": NODE_IP},
                    {"type": "Hostname", "address": spec.name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "machineID": hashlib.md5(spec.name.encode()).hexdigest(),
                    "systemUUID": hashlib.md5(b"uuid" + spec.name.encode()).hexdigest(),
                    "bootID": hashlib.md5(b"boot" + spec.name.encode()).hexdigest(),
                    "kernelVersion": "6.1.0-fermata",
                    "osImage": "Fermata test kubelet",
                    "containerRuntimeVersion": "fermata://1.0.0",
                    "kubeletVersion": KUBELET_VERSION,
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }

    def _heartbeat(self, spec: NodeSpec) -> None:
        try:
            self._core.patch_node_status(spec.name, self._node_status(spec))
        except ApiException as exc:
            if exc.status != 404:
                raise
            with self._lock:
                managed = spec.name in self._nodes
            if managed:  # a kubelet re-registers a Node deleted behind its back
                log.info("node.reregister", node=spec.name)
                self._register(spec)
            return
        self._renew_lease(spec.name)

    def _renew_lease(self, node_name: str) -> None:
        renew = {"spec": {"holderIdentity": node_name, "renewTime": _micro_now()}}
        try:
            self._coordination.patch_namespaced_lease(node_name, NODE_LEASE_NAMESPACE, renew)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        node = _body(self._core.read_node(node_name, _preload_content=False))
        lease: JSON = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": node_name,
                "namespace": NODE_LEASE_NAMESPACE,
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "name": node_name,
                        "uid": node["metadata"]["uid"],
                    }
                ],
            },
            "spec": {
                "holderIdentity": node_name,
                "leaseDurationSeconds": 40,
                "renewTime": _micro_now(),
            },
        }
        with contextlib.suppress(ApiException):
            self._coordination.create_namespaced_lease(NODE_LEASE_NAMESPACE, lease)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            with self._lock:
                specs = list(self._nodes.values())
            for spec in specs:
                if self._stop.is_set():
                    return
                try:
                    self._heartbeat(spec)
                except Exception as exc:
                    log.warning("node.heartbeat_failed", node=spec.name, error=str(exc))

    # -- pod watch --------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                resource_version = self._watch(resource_version)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("pods.watch_failed", error=str(exc) or type(exc).__name__)
                resource_version = None
                self._stop.wait(1.0)

    def _relist(self) -> str:
        listing = _body(
            self._core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=", _preload_content=False)
        )
        items = listing.get("items") or []
        seen: set[tuple[str, str]] = set()
        with self._lock:
            for pod in items:
                key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
                seen.add(key)
                self._pods[key] = pod
            gone = [key for key in self._pods if key not in seen]
            for key in gone:
                del self._pods[key]
        for key in [*seen, *gone]:
            self._queue.put(key)
        self._synced.set()
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, resource_version: str) -> str | None:
        """Follow one watch request; returns the last resourceVersion, or None to relist."""
        resp = self._core.list_pod_for_all_namespaces(
            field_selector="spec.nodeName!=",
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=240,
            _preload_content=False,
            _request_timeout=(5, 300),
        )
        self._watch_resp = resp
        try:
            for line in self._lines(resp):
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    log.info("pods.watch_error", status=obj)
                    return None
                new_version = obj.get("metadata", {}).get("resourceVersion")
                if new_version:
                    resource_version = str(new_version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_event(str(kind), obj)
                if self._stop.is_set():
                    break
        finally:
            self._watch_resp = None
            resp.release_conn()
        return resource_version

    @staticmethod
    def _lines(resp: Any) -> Iterator[bytes]:
        pending = b""
        for chunk in resp.stream(65536, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from (line for line in lines if line.strip())
        if pending.strip():
            yield pending

    def _on_event(self, kind: str, pod: JSON) -> None:
        meta = pod.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        with self._lock:
            if kind == "DELETED":
                current = self._pods.get(key)
                if current is not None and current["metadata"].get("uid") == meta.get("uid"):
                    del self._pods[key]
            else:
                self._pods[key] = pod
        self._queue.put(key)

    def _work_loop(self) -> None:
        while True:
            key = self._queue.get()
            if key is None or self._stop.is_set():
                return
            try:
                self._sync(key)
            except _NotReady as exc:
                log.info("pod.not_ready", namespace=key[0], pod=key[1], reason=str(exc))
                self._requeue(key, 2.0)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning(
                    "pod.sync_failed",
                    namespace=key[0],
                    pod=key[1],
                    error=str(exc) or type(exc).__name__,
                )
                self._requeue(key, 1.0)

    def _requeue(self, key: tuple[str, str], delay: float) -> None:
        timer = threading.Timer(delay, self._queue.put, args=(key,))
        timer.daemon = True
        timer.start()

    def _sync(self, key: tuple[str, str]) -> None:
        with self._lock:
            pod = self._pods.get(key)
            if pod is None:
                orphans = [
                    rt
                    for rt in self._runtimes.values()
                    if (rt.namespace, rt.name) == key and not rt.done.is_set()
                ]
            node = (pod or {}).get("spec", {}).get("nodeName")
            ours = node in self._nodes
            removed = node in self._removed_nodes
        if pod is None:  # deleted by someone else (e.g. force delete): kill what is left
            for rt in orphans:
                self._signal(rt, signal.SIGKILL)
            return
        if not ours:
            if removed:
                self._gc_pod(pod)
            return
        meta, status = pod["metadata"], pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            self._handle_deletion(pod)
            return
        if status.get("phase") in TERMINAL_PHASES:
            return
        mode = (meta.get("annotations") or {}).get(MODE_ANNOTATION, self.mode)
        if mode == "auto" and self._image_of(pod) is not None:
            mode = "exec"  # a pod whose image was built runs it for real
        if mode == "auto":
            if status.get("phase", "Pending") == "Pending":
                self._patch_status(pod, self._running_status(pod))
                log.info("pod.running", namespace=key[0], pod=key[1], node=node)
        elif mode == "exec":
            with self._lock:
                launched = meta["uid"] in self._runtimes
            if not launched and status.get("phase", "Pending") == "Pending":
                self._launch(pod)

    # -- deletion -----------------------------------------------------------------------------

    def _handle_deletion(self, pod: JSON) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            rt = self._runtimes.get(uid)
            signalled = uid in self._deletions
        if rt is not None and rt.process is not None and rt.process.poll() is None:
            if signalled:
                return  # the process waiter writes the final status and deletes the pod
            with self._lock:
                self._deletions.add(uid)
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod.get("spec", {}).get("terminationGracePeriodSeconds", 30)
            rt.deleting = True
            log.info("pod.killing", namespace=rt.namespace, pod=rt.name, grace=grace)
            self._signal(rt, signal.SIGTERM)
            killer = threading.Thread(target=self._kill_after, args=(rt, float(grace)), daemon=True)
            killer.start()
            return
        with self._lock:
            if uid in self._force_deleted:
                return  # waiting for finalizers to be removed
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if rt is None and phase not in TERMINAL_PHASES:
            # Like a kubelet: the pod reaches a terminal phase before it is removed, so that
            # finalizer holders see how it ended. Fake containers "exit" on SIGTERM.
            if phase == "Running":
                final = self._terminated_status(pod, 143, "Error")
            else:
                final = self._terminated_status(
                    pod,
                    137,
                    "ContainerStatusUnknown",
                    "The container could not be located when the pod was terminated",
                )
            self._patch_status(pod, final)
        self._force_delete(meta["namespace"], meta["name"], uid)

    def _kill_after(self, rt: _PodRuntime, grace: float) -> None:
        if not rt.done.wait(grace):
            log.info("pod.sigkill", namespace=rt.namespace, pod=rt.name)
            self._signal(rt, signal.SIGKILL)

    @staticmethod
    def _signal(rt: _PodRuntime, sig: signal.Signals) -> None:
        if rt.process is not None and rt.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rt.process.pid, sig)

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        try:
            self._core.delete_namespaced_pod(
                name,
                namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
            )
            log.info("pod.deleted", namespace=namespace, pod=name)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
        with self._lock:
            self._force_deleted.add(uid)

    def _gc_pod(self, pod: JSON) -> None:
        """Like the pod GC for pods on a vanished node: DisruptionTarget, Failed, deleted."""
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            rt = self._runtimes.get(uid)
            if uid in self._force_deleted:
                return
        if rt is not None:
            rt.deleting = True
            self._signal(rt, signal.SIGKILL)
        if (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES:
            now = _now()
            patch = {
                "status": {
                    "phase": "Failed",
                    "conditions": [
                        {
                            "type": "DisruptionTarget",
                            "status": "True",
                            "reason": "DeletionByPodGC",
                            "message": "PodGC: node no longer exists",
                            "lastTransitionTime": now,
                        }
                    ],
                }
            }
            with contextlib.suppress(ApiException):
                self._core.patch_namespaced_pod_status(meta["name"], meta["namespace"], patch)
        self._force_delete(meta["namespace"], meta["name"], uid)

    # -- pod status -----------------------------------------------------------------------------

    def _patch_status(self, pod: JSON, status: JSON) -> None:
        meta = pod["metadata"]
        self._core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})

    @staticmethod
    def _container_id(pod: JSON, container: str) -> str:
        return f"fermata://{pod['metadata']['uid'][:8]}-{container}"

    @staticmethod
    def _condition(kind: str, value: bool, now: str, reason: str | None = None) -> JSON:
        cond: JSON = {
            "type": kind,
            "status": "True" if value else "False",
            "lastTransitionTime": now,
        }
        if reason:
            cond["reason"] = reason
        return cond

    def _running_status(self, pod: JSON, started_at: str | None = None) -> JSON:
        now = _now()
        started = started_at or now
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        init_statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": c.get("image", ""),
                "containerID": self._container_id(pod, c["name"]),
                "ready": True,
                "restartCount": 0,
                "state": {
                    "waiting": None,
                    "running": None,
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": started,
                        "finishedAt": started,
                        "containerID": self._container_id(pod, c["name"]),
                    },
                },
            }
            for c in spec.get("initContainers") or []
        ]
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": c.get("image", ""),
                "containerID": self._container_id(pod, c["name"]),
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"waiting": None, "terminated": None, "running": {"startedAt": started}},
            }
            for c in spec.get("containers") or []
        ]
        body: JSON = {
            "phase": "Running",
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": status.get("startTime") or started,
            "conditions": [
                self._condition("PodReadyToStartContainers", True, now),
                self._condition("Initialized", True, now),
                self._condition("ContainersReady", True, now),
                self._condition("Ready", True, now),
            ],
            "containerStatuses": statuses,
        }
        if init_statuses:
            body["initContainerStatuses"] = init_statuses
        return body

    def _terminated_status(
        self,
        pod: JSON,
        exit_code: int,
        reason: str | None = None,
        message: str | None = None,
        container: str | None = None,
        started_at: str | None = None,
    ) -> JSON:
        now = _now()
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        containers = spec.get("containers") or []
        target = container or (containers[0]["name"] if containers else "")
        previous = {cs.get("name"): cs for cs in status.get("containerStatuses") or []}
        statuses = []
        for c in containers:
            running = ((previous.get(c["name"]) or {}).get("state") or {}).get("running") or {}
            code = exit_code if c["name"] == target else 0
            terminated: JSON = {
                "exitCode": code,
                "reason": (reason or ("Completed" if code == 0 else "Error"))
                if c["name"] == target
                else "Completed",
                "startedAt": started_at or running.get("startedAt") or now,
                "finishedAt": now,
                "containerID": self._container_id(pod, c["name"]),
            }
            if message and c["name"] == target:
                terminated["message"] = message
            statuses.append(
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": c.get("image", ""),
                    "containerID": self._container_id(pod, c["name"]),
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"waiting": None, "running": None, "terminated": terminated},
                }
            )
        phase = "Succeeded" if exit_code == 0 else "Failed"
        done_reason = "PodCompleted" if phase == "Succeeded" else "PodFailed"
        return {
            "phase": phase,
            "hostIP": status.get("hostIP") or NODE_IP,
            "hostIPs": status.get("hostIPs") or [{"ip": NODE_IP}],
            "startTime": status.get("startTime") or now,
            "conditions": [
                self._condition("PodReadyToStartContainers", False, now),
                self._condition("Initialized", True, now, done_reason),
                self._condition("ContainersReady", False, now, done_reason),
                self._condition("Ready", False, now, done_reason),
            ],
            "containerStatuses": statuses,
        }

    # -- manual controls (callable from tests) ---------------------------------------------------

    def read_pod(self, namespace: str, name: str) -> JSON:
        return _body(self._core.read_namespaced_pod(name, namespace, _preload_content=False))

    def _bound_pod(self, namespace: str, name: str) -> JSON:
        pod = self.read_pod(namespace, name)
        if not (pod.get("spec") or {}).get("nodeName"):
            raise ValueError(f"pod {namespace}/{name} is not bound to a node yet")
        return pod

    def set_running(self, namespace: str, name: str) -> None:
        pod = self._bound_pod(namespace, name)
        self._patch_status(pod, self._running_status(pod))

    def set_succeeded(self, namespace: str, name: str, exit_code: int = 0) -> None:
        if exit_code != 0:
            raise ValueError("a succeeded pod exits 0; use set_failed")
        pod = self._bound_pod(namespace, name)
        self._patch_status(pod, self._terminated_status(pod, 0))

    def set_failed(
        self,
        namespace: str,
        name: str,
        exit_code: int = 1,
        reason: str = "Error",
        message: str | None = None,
        container: str | None = None,
    ) -> None:
        """Terminate ``container`` (default: the first) with ``exit_code`` and ``reason``
        (``Error``, ``OOMKilled``, ...); the pod goes Failed."""
        if exit_code == 0:
            raise ValueError("a failed container exits non-zero")
        pod = self._bound_pod(namespace, name)
        self._patch_status(pod, self._terminated_status(pod, exit_code, reason, message, container))

    def add_disruption_target(
        self,
        namespace: str,
        name: str,
        reason: str = "TerminationByKubelet",
        message: str = "Pod was terminated in response to imminent node shutdown.",
    ) -> None:
        pod = self.read_pod(namespace, name)
        condition = self._condition("DisruptionTarget", True, _now(), reason)
        condition["message"] = message
        self._patch_status(pod, {"conditions": [condition]})

    def evict(self, namespace: str, name: str, grace_period_seconds: int | None = None) -> None:
        """Evict through the Eviction API (PodDisruptionBudgets apply)."""
        body: JSON = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        if grace_period_seconds is not None:
            body["deleteOptions"] = {"gracePeriodSeconds": grace_period_seconds}
        self._core.create_namespaced_pod_eviction(name, namespace, body)

    def logs(self, namespace: str, name: str) -> str:
        """stdout+stderr of the latest exec-mode process of pod ``namespace/name``."""
        with self._lock:
            path = self._logs.get((namespace, name))
        if path is None:
            raise KeyError(f"no process was run for pod {namespace}/{name}")
        return path.read_text(errors="replace")

    def wait_for_pod(
        self,
        namespace: str,
        name: str,
        predicate: Callable[[JSON], bool],
        timeout: float = 30.0,
    ) -> JSON:
        """Poll the pod until ``predicate(pod)``; returns it. TimeoutError with the last state."""
        deadline = time.monotonic() + timeout
        last: JSON = {}
        while True:
            try:
                last = self.read_pod(namespace, name)
                if predicate(last):
                    return last
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"pod {namespace}/{name}: condition not met in {timeout}s; "
                    f"status={json.dumps(last.get('status'))}"
                )
            time.sleep(0.1)

    def wait_for_phase(self, namespace: str, name: str, *phases: str, timeout: float = 30.0) -> JSON:
        return self.wait_for_pod(
            namespace,
            name,
            lambda pod: (pod.get("status") or {}).get("phase") in phases,
            timeout,
        )

    # -- exec mode -----------------------------------------------------------------------------

    def _launch(self, pod: JSON) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        containers = spec.get("containers") or []
        if not containers:
            return
        container = containers[0]
        root = self.workdir / "pods" / f"{namespace}_{name}_{uid[:8]}"
        image = self._image_of(pod)
        if image is not None:
            self._launch_image(pod, container, image, root)
            return
        rootfs = root / "root"
        rootfs.mkdir(parents=True, exist_ok=True)

        # May raise _NotReady (missing ConfigMap/Secret): the pod stays Pending and is retried.
        env, declared = self._container_env(pod, container)
        volumes = self._materialize_volumes(pod, root / "volumes")
        self._mount(container, volumes, rootfs)
        kubeconfig = self._pod_kubeconfig(pod, root / "kubeconfig")

        # The pod's own path values under a mount point at the materialised volumes.
        mount_paths = [
            str(m["mountPath"]) for m in container.get("volumeMounts") or [] if m["name"] in volumes
        ]
        for key in declared:
            mapped = map_mounted_path(env[key], mount_paths, rootfs)
            if mapped is not None:
                env[key] = str(mapped)
        env.update({"KUBECONFIG": str(kubeconfig), "HOSTNAME": name})
        argv = [expand(part, env) for part in [*container.get("command", []), *container.get("args", [])]]
        started_at = _now()
        log_path = root / "container.log"
        rt = _PodRuntime(uid, namespace, name, root, log_path, started_at)
        with self._lock:
            self._runtimes[uid] = rt
            self._logs[(namespace, name)] = log_path

        executable = self._resolve(container.get("command") or [])
        if executable is None:
            rt.exit_code = 128
            rt.done.set()
            message = f"exec mode: cannot run command {container.get('command')!r}"
            log_path.write_text(message + "\n")
            self._patch_status(
                pod, self._terminated_status(pod, 128, "StartError", message, started_at=started_at)
            )
            return
        argv[0] = executable
        cwd = self._working_dir(container.get("workingDir"), mount_paths, rootfs)
        cwd.mkdir(parents=True, exist_ok=True)
        self._start_process(pod, rt, argv, env, cwd)

    def _start_process(
        self, pod: JSON, rt: _PodRuntime, argv: list[str], env: Mapping[str, str], cwd: Path
    ) -> None:
        rt.log_file = rt.log_path.open("ab")
        try:
            rt.process = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=rt.log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            rt.exit_code = 128
            rt.done.set()
            self._patch_status(
                pod,
                self._terminated_status(pod, 128, "StartError", str(exc), started_at=rt.started_at),
            )
            return
        log.info("pod.exec", namespace=rt.namespace, pod=rt.name, argv=argv, pid=rt.process.pid)
        self._patch_status(pod, self._running_status(pod, rt.started_at))
        waiter = threading.Thread(target=self._wait_process, args=(rt, pod), daemon=True)
        waiter.start()

    # -- image mode: the container from its image's root file system ------------------------------

    def _launch_image(self, pod: JSON, container: JSON, image: Image, root: Path) -> None:
        """Run the container as a runtime would: its image's root file system (an overlay), its
        volumes bind-mounted at their paths, its uid/gid, env, working directory and command, in a
        private mount namespace (:mod:`fermata_dev.podexec`). Nothing is remapped."""
        meta = pod["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        root.mkdir(parents=True, exist_ok=True)
        # May raise _NotReady (missing ConfigMap/Secret): the pod stays Pending and is retried.
        env, _ = self._container_env(pod, container, base=self._image_env(image, name))
        volumes = self._materialize_volumes(pod, root / "volumes")
        log_path = root / "container.log"
        rt = _PodRuntime(uid, namespace, name, root, log_path, _now())
        with self._lock:
            self._runtimes[uid] = rt
            self._logs[(namespace, name)] = log_path
        if os.geteuid() != 0:  # a start error, as a runtime that cannot run the image reports
            rt.exit_code = 128
            rt.done.set()
            message = "image mode needs root (mount namespace, overlay, chroot)"
            log_path.write_text(message + "\n")
            self._patch_status(pod, self._terminated_status(pod, 128, "StartError", message))
            return
        uid_gid = run_as(pod, container, image)
        cspec = ContainerSpec(
            rootfs=str(image.rootfs),
            scratch=str(root / "container"),
            argv=image_argv(container, image, env),
            env=env,
            uid=uid_gid[0],
            gid=uid_gid[1],
            working_dir=str(container.get("workingDir") or image.working_dir or "/"),
            read_only_root=bool(_security(pod, container).get("readOnlyRootFilesystem")),
            groups=[int(g) for g in _fs_groups(pod)],
            mounts=[*(Mount(str(d), str(d)) for d in self.node_mounts), *image_mounts(container, volumes)],
            forward_ports=None if spec_of(pod).get("hostNetwork") else self._forwarded(),
        )
        spec_path = root / "container.json"
        spec_path.write_text(cspec.to_json())
        spec_path.chmod(0o600)
        launcher = [
            "unshare", "--mount", "--propagation", "private",
            sys.executable, "-m", "fermata_dev.podexec", str(spec_path),
        ]  # fmt: skip
        log.info("pod.image", namespace=namespace, pod=name, image=image.ref, argv=cspec.argv)
        self._start_process(pod, rt, launcher, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, root)

    def _image_of(self, pod: JSON) -> Image | None:
        containers = spec_of(pod).get("containers") or []
        return self.images.get(str(containers[0].get("image", ""))) if containers else None

    def _forwarded(self) -> list[int]:
        server = urlsplit(str(self._cluster_entry.get("server", "")))
        return sorted({server.port or 443, *self.forward_ports})

    def _image_env(self, image: Image, pod_name: str) -> dict[str, str]:
        """The image's ``ENV``, the node's ``extra_env``, and what a kubelet adds: the pod's
        hostname and the API server's address for in-cluster clients (the token and CA come from
        the pod's own volume)."""
        server = urlsplit(str(self._cluster_entry.get("server", "")))
        return {
            **image.env,
            **self.extra_env,
            "HOSTNAME": pod_name,
            "KUBERNETES_SERVICE_HOST": server.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(server.port or 443),
        }

    @staticmethod
    def _working_dir(workdir: str | None, mount_paths: Sequence[str], rootfs: Path) -> Path:
        """``workingDir`` on the host: under a mount, the volume; else the host's directory if
        there is one, else a directory below the pod root (an image's own directory)."""
        if not workdir:
            return rootfs
        mapped = map_mounted_path(workdir, mount_paths, rootfs)
        if mapped is not None:
            return mapped
        if Path(workdir).is_dir():
            return Path(workdir)
        return rootfs / workdir.lstrip("/")

    def _resolve(self, command: Sequence[str]) -> str | None:
        if not command:
            return None
        name = command[0]
        if name in self.executables:
            return self.executables[name]
        if os.path.isabs(name):
            return name if os.access(name, os.X_OK) else None
        return shutil.which(name, path=self.extra_env.get("PATH") or os.environ.get("PATH"))

    def _wait_process(self, rt: _PodRuntime, pod: JSON) -> None:
        assert rt.process is not None
        returncode = rt.process.wait()
        rt.exit_code = _exit_code(returncode)
        rt.done.set()
        if rt.log_file is not None:
            rt.log_file.close()
            rt.log_file = None
        log.info("pod.exited", namespace=rt.namespace, pod=rt.name, exit_code=rt.exit_code)
        if self._stop.is_set():
            return
        for attempt in range(30):
            try:
                current = self.read_pod(rt.namespace, rt.name)
                if current["metadata"]["uid"] != rt.uid:
                    return
                self._patch_status(
                    current,
                    self._terminated_status(current, rt.exit_code, started_at=rt.started_at),
                )
                if rt.deleting or current["metadata"].get("deletionTimestamp"):
                    self._force_delete(rt.namespace, rt.name, rt.uid)
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                log.warning("pod.final_status_failed", pod=rt.name, attempt=attempt, error=str(exc))
            except Exception as exc:  # API server restarting: retry
                log.warning("pod.final_status_failed", pod=rt.name, attempt=attempt, error=str(exc))
            if self._stop.wait(1.0):
                return

    def _read_configmap(self, namespace: str, name: str, optional: bool) -> dict[str, bytes] | None:
        try:
            cm = _body(self._core.read_namespaced_config_map(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise _NotReady(f'configmap "{name}" not found') from exc
            raise
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return data

    def _read_secret(self, namespace: str, name: str, optional: bool) -> dict[str, bytes] | None:
        try:
            secret = _body(self._core.read_namespaced_secret(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise _NotReady(f'secret "{name}" not found') from exc
            raise
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    @staticmethod
    def _field_value(pod: JSON, path: str) -> str:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        values = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": spec.get("nodeName"),
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.hostIP": NODE_IP,
            "status.hostIPs": NODE_IP,
            "status.podIP": POD_IP,
            "status.podIPs": POD_IP,
        }
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        return str(values.get(path) or "")

    def _container_env(
        self, pod: JSON, container: JSON, base: Mapping[str, str] | None = None
    ) -> tuple[dict[str, str], set[str]]:
        """The process environment, and the names the pod itself set (``envFrom`` and ``env``),
        on top of ``base`` (default: the host variables passed through and ``extra_env``)."""
        namespace = pod["metadata"]["namespace"]
        if base is None:
            env = {k: os.environ[k] for k in self.passthrough_env if k in os.environ}
            env.update(self.extra_env)
        else:
            env = dict(base)
        declared: set[str] = set()

        def put(name: str, value: str) -> None:
            env[name] = value
            declared.add(name)

        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            data: dict[str, bytes] | None = None
            if ref := source.get("configMapRef"):
                data = self._read_configmap(namespace, ref["name"], bool(ref.get("optional")))
            elif ref := source.get("secretRef"):
                data = self._read_secret(namespace, ref["name"], bool(ref.get("optional")))
            for key, value in (data or {}).items():
                put(prefix + key, value.decode(errors="replace"))
        for var in container.get("env") or []:
            name = var["name"]
            value_from = var.get("valueFrom")
            if value_from is None:
                put(name, expand(var.get("value", ""), env))
            elif ref := value_from.get("fieldRef"):
                put(name, self._field_value(pod, ref.get("fieldPath", "")))
            elif ref := value_from.get("configMapKeyRef"):
                cm = self._read_configmap(namespace, ref["name"], bool(ref.get("optional")))
                if cm is not None and ref["key"] in cm:
                    put(name, cm[ref["key"]].decode(errors="replace"))
                elif not ref.get("optional"):
                    raise _NotReady(f'key {ref["key"]} not in configmap "{ref["name"]}"')
            elif ref := value_from.get("secretKeyRef"):
                secret = self._read_secret(namespace, ref["name"], bool(ref.get("optional")))
                if secret is not None and ref["key"] in secret:
                    put(name, secret[ref["key"]].decode(errors="replace"))
                elif not ref.get("optional"):
                    raise _NotReady(f'key {ref["key"]} not in secret "{ref["name"]}"')
            elif ref := value_from.get("resourceFieldRef"):
                resources = container.get("resources") or {}
                kind, _, resource = str(ref.get("resource", "")).partition(".")
                put(name, str((resources.get(kind) or {}).get(resource, "0")))
        return env, declared

    @staticmethod
    def _write_items(target: Path, data: Mapping[str, bytes], items: Sequence[JSON] | None) -> None:
        target.mkdir(parents=True, exist_ok=True)
        if items:
            for item in items:
                if item["key"] in data:
                    path = target / item.get("path", item["key"])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data[item["key"]])
        else:
            for key, value in data.items():
                (target / key).write_bytes(value)

    def _downward_items(self, pod: JSON, target: Path, items: Sequence[JSON]) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for item in items:
            if ref := item.get("fieldRef"):
                path = target / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self._field_value(pod, ref.get("fieldPath", "")))

    def _materialize_volumes(self, pod: JSON, base: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        volumes: dict[str, Path] = {}
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            name = volume["name"]
            target = base / name
            if ref := volume.get("configMap"):
                data = self._read_configmap(namespace, ref["name"], bool(ref.get("optional")))
                self._write_items(target, data or {}, ref.get("items"))
            elif ref := volume.get("secret"):
                data = self._read_secret(namespace, ref["secretName"], bool(ref.get("optional")))
                self._write_items(target, data or {}, ref.get("items"))
            elif ref := volume.get("downwardAPI"):
                self._downward_items(pod, target, ref.get("items") or [])
            elif ref := volume.get("projected"):
                target.mkdir(parents=True, exist_ok=True)
                for source in ref.get("sources") or []:
                    self._project(pod, target, source)
            elif ref := volume.get("persistentVolumeClaim"):
                target = self.workdir / "pvcs" / namespace / ref["claimName"]
                target.mkdir(parents=True, exist_ok=True)
            elif ref := volume.get("hostPath"):
                target = Path(ref["path"])
                if ref.get("type") in ("DirectoryOrCreate", None, ""):
                    target.mkdir(parents=True, exist_ok=True)
            else:  # emptyDir and anything this kubelet does not model: a fresh directory
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(0o777)  # as a kubelet makes an emptyDir: any uid may write
            volumes[name] = target
        return volumes

    def _project(self, pod: JSON, target: Path, source: JSON) -> None:
        namespace = pod["metadata"]["namespace"]
        if ref := source.get("configMap"):
            # kube-root-ca.crt is published by a controller this control plane does not run.
            optional = bool(ref.get("optional")) or ref["name"] == "kube-root-ca.crt"
            data = self._read_configmap(namespace, ref["name"], optional)
            self._write_items(target, data or {}, ref.get("items"))
        elif ref := source.get("secret"):
            data = self._read_secret(namespace, ref["name"], bool(ref.get("optional")))
            self._write_items(target, data or {}, ref.get("items"))
        elif ref := source.get("downwardAPI"):
            self._downward_items(pod, target, ref.get("items") or [])
        elif ref := source.get("serviceAccountToken"):
            audience = ref.get("audience")
            token = self._token(pod, [audience] if audience else [], int(ref.get("expirationSeconds", 3607)))
            path = target / ref.get("path", "token")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token)

    @staticmethod
    def _mount(container: JSON, volumes: Mapping[str, Path], rootfs: Path) -> None:
        for mount in image_mounts(container, volumes):
            target = rootfs / mount.target.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            target.symlink_to(mount.source)

    def _token(self, pod: JSON, audiences: list[str], expiration: int) -> str:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        body: JSON = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": audiences,
                "expirationSeconds": expiration,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        result = _body(
            self._core.create_namespaced_service_account_token(
                spec.get("serviceAccountName") or "default",
                meta["namespace"],
                body,
                _preload_content=False,
            )
        )
        return str(result["status"]["token"])

    def _read_cluster_entry(self) -> JSON:
        data: JSON = yaml.safe_load(self.kubeconfig.read_text()) or {}
        contexts: dict[str, JSON] = {c["name"]: c.get("context") or {} for c in data.get("contexts") or []}
        clusters: dict[str, JSON] = {c["name"]: c.get("cluster") or {} for c in data.get("clusters") or []}
        context: JSON = contexts.get(str(data.get("current-context"))) or {}
        if not context and contexts:
            context = next(iter(contexts.values()))
        cluster: JSON = clusters.get(str(context.get("cluster"))) or {}
        if not cluster and clusters:
            cluster = next(iter(clusters.values()))
        return dict(cluster)

    def _pod_kubeconfig(self, pod: JSON, path: Path) -> Path:
        meta = pod["metadata"]
        sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        token = self._token(pod, [], self.token_expiration_seconds)
        user = f"system:serviceaccount:{meta['namespace']}:{sa}"
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": self._cluster_entry}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {"cluster": "local", "user": user, "namespace": meta["namespace"]},
                }
            ],
            "current-context": "pod",
        }
        path.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
        path.chmod(0o600)
        return path


# -- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fermata_dev.kubelet",
        description="Play GPU nodes (no container runtime) against a Kubernetes API server.",
    )
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--nodes", type=Path, help="YAML list of nodes (default: 2 spot + 2 on-demand)")
    parser.add_argument("--mode", choices=MODES, default="auto")
    parser.add_argument("--workdir", type=Path, help="pod roots and logs (default: a temp dir)")
    parser.add_argument(
        "--executable",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="map a pod command name to a local executable (exec mode); repeatable",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    args = parser.parse_args(argv)

    executables = {}
    for item in args.executable:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--executable {item!r}: expected NAME=PATH")
        executables[name] = path
    nodes = load_nodes(args.nodes) if args.nodes else list(DEFAULT_NODES)
    kubelet = LocalKubelet(
        args.kubeconfig,
        nodes,
        mode=args.mode,
        workdir=args.workdir,
        executables=executables,
        heartbeat_interval=args.heartbeat_interval,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kubelet.start()
    try:
        stop.wait()
    finally:
        kubelet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
