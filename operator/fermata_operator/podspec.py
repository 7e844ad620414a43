"""The objects a TrainingRun needs: the namespace's trainer identity, the run's pod.

A run's trainer pod carries its configuration in an annotation (shown to the container as a file
through a downward-API volume) and runs as the namespace's ``fermata-trainer`` ServiceAccount,
whose Role may patch ``trainingruns/status`` of the namespace; the chart's status-guard policy
narrows that to the run whose recorded pod the token is bound to. Per run the operator creates
only the pod, plus a RoleBinding (and a ServiceAccount) when ``spec.serviceAccount`` asks for
an identity of its own.

Everything here is a pure function of the run and the operator settings, so a retry or an
operator restart renders byte-identical objects (and pod names are deterministic per
incarnation: creating one twice is a harmless 409).
"""

from __future__ import annotations

import json
from typing import Any

from fermata_api import CapacityType, TrainingRunSpec, contract
from fermata_api.meta import (
    ANNOTATION_CAPACITY,
    CAPACITY_LABELS,
    GPU_RESOURCE,
    INSTANCE_TYPE_LABEL,
    KUEUE_LABELS,
    LABEL_COMPONENT,
    LABEL_INCARNATION,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_RUN,
    MANAGED_BY,
    POD_FINALIZER,
)
from fermata_api.pod import ServiceAccountSpec
from fermata_operator import podoverrides
from fermata_operator.settings import OperatorSettings

CONFIG_KEY = "trainer.json"
CONFIG_DIR = "/etc/fermata"
SCRATCH_DIR = "/tmp"


def pod_name(run_name: str, incarnation: int) -> str:
    return f"{run_name}-{incarnation}"


#: The namespace's trainer ServiceAccount, its Role and their RoleBinding (one each per namespace).
TRAINER_IDENTITY = "fermata-trainer"
#: ``app.kubernetes.io/component`` of the namespace's trainer identity (no run, no owner).
IDENTITY_COMPONENT = "trainer-identity"
#: The pod annotation holding the trainer's configuration (JSON); mounted at ``CONFIG_DIR``.
ANNOTATION_CONFIG = f"{contract.API_GROUP}/trainer-config"


def service_account_name(run_name: str) -> str:
    """A run's own ServiceAccount (``spec.serviceAccount.annotations``), and its RoleBinding."""
    return f"{run_name}-trainer"


def trainer_service_account(run_name: str, identity: ServiceAccountSpec | None) -> str:
    """The ServiceAccount the trainer runs as: the one named in spec.serviceAccount, the run's own
    when spec.serviceAccount has annotations for it, else the namespace's ``fermata-trainer``."""
    if identity is not None and identity.name:
        return identity.name
    if identity is not None and identity.annotations:
        return service_account_name(run_name)
    return TRAINER_IDENTITY


def labels(run_name: str, component: str = "trainer") -> dict[str, str]:
    return {
        LABEL_NAME: "fermata",
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_RUN: run_name,
    }


def owner_reference(run: dict[str, Any]) -> dict[str, Any]:
    meta = run["metadata"]
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(run: dict[str, Any], name: str, component: str = "trainer") -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run["metadata"]["namespace"],
        "labels": labels(run["metadata"]["name"], component),
        "ownerReferences": [owner_reference(run)],
    }


def trainer_config(
    run: dict[str, Any], spec: TrainingRunSpec, settings: OperatorSettings
) -> contract.TrainerConfig:
    meta = run["metadata"]
    return contract.TrainerConfig(
        run=contract.RunRef(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid")),
        model=spec.model,
        dataset=spec.dataset,
        training=spec.training,
        evaluation=spec.evaluation,
        storage=spec.storage,
        reporting=contract.ReportingSpec(heartbeat_seconds=settings.trainer_heartbeat_seconds),
        gpus=spec.resources.gpus,
        work_dir=f"{SCRATCH_DIR}/fermata",
    )


def config_json(run: dict[str, Any], spec: TrainingRunSpec, settings: OperatorSettings) -> str:
    """The trainer's configuration as the pod carries it (annotation ``ANNOTATION_CONFIG``): each
    pod holds the configuration it was created from, so a restart reads exactly that."""
    return json.dumps(trainer_config(run, spec, settings).wire(), sort_keys=True, separators=(",", ":"))


def identity_labels() -> dict[str, str]:
    return {LABEL_NAME: "fermata", LABEL_COMPONENT: IDENTITY_COMPONENT, LABEL_MANAGED_BY: MANAGED_BY}


def _binding(namespace: str, name: str, subject: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TRAINER_IDENTITY},
        "subjects": [{"kind": "ServiceAccount", "name": subject, "namespace": namespace}],
    }


def trainer_identity(namespace: str) -> list[dict[str, Any]]:
    """The namespace's trainer identity, shared by its runs (no owner: it outlives each of them).

    The Role may only patch ``trainingruns/status`` — no reads, no spec. Which run a trainer may
    patch is decided at admission: the chart's status-guard policy lets a token bound to a pod
    patch only the run whose ``status.pod`` (or preparation pod) is that pod."""
    meta = {"name": TRAINER_IDENTITY, "namespace": namespace, "labels": identity_labels()}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": dict(meta),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [
                {
                    "apiGroups": [contract.API_GROUP],
                    "resources": [f"{contract.PLURAL}/status"],
                    "verbs": ["patch"],
                }
            ],
        },
        _binding(namespace, TRAINER_IDENTITY, TRAINER_IDENTITY, dict(meta)),
    ]


def is_identity(obj: dict[str, Any]) -> bool:
    """Whether ``obj`` is (a rendering of) the namespace's trainer identity, not a run's object."""
    labels_ = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels_.get(LABEL_COMPONENT) == IDENTITY_COMPONENT and LABEL_RUN not in labels_)


def trainer_rbac(run: dict[str, Any], identity: ServiceAccountSpec | None = None) -> list[dict[str, Any]]:
    """What the run's trainer needs: the namespace's identity, and — only when
    ``spec.serviceAccount`` asks for another ServiceAccount — a RoleBinding of the namespace's
    trainer Role to it (plus that ServiceAccount when the run has its own, with annotations).
    The run's objects are controlled by the run; the namespace's are nobody's."""
    ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
    shared = trainer_identity(ns)
    subject = trainer_service_account(name, identity)
    if subject == TRAINER_IDENTITY:
        return shared
    own: list[dict[str, Any]] = []
    if identity is not None and identity.annotations:
        own.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {**_meta(run, subject), "annotations": dict(identity.annotations)},
                "automountServiceAccountToken": False,
            }
        )
    own.append(_binding(ns, service_account_name(name), subject, _meta(run, service_account_name(name))))
    return [*shared, *own]


def run_objects(identity: ServiceAccountSpec | None, run_name: str) -> list[tuple[str, str]]:
    """(kind, name) of the run's own supporting objects (what its cleanup deletes)."""
    subject = trainer_service_account(run_name, identity)
    if subject == TRAINER_IDENTITY:
        return []
    own = [("RoleBinding", service_account_name(run_name))]
    if identity is not None and identity.annotations:
        own.append(("ServiceAccount", subject))
    return own


def _placement(
    instance_types: list[str],
    capacity: CapacityType,
    gpus: int,
    tolerations_spec: list[Any],
    node_selector: dict[str, str],
    settings: OperatorSettings,
) -> dict[str, Any]:
    """Node affinity for the capacity type (Karpenter or EKS labels) and instance types."""
    types = {
        "key": INSTANCE_TYPE_LABEL,
        "operator": "In",
        "values": list(instance_types),
    }
    terms = [
        {
            "matchExpressions": [
                {"key": key, "operator": "In", "values": [values[capacity.value]]},
                types,
            ]
        }
        for key, values in CAPACITY_LABELS.items()
    ]
    tolerations: list[dict[str, Any]] = []
    if gpus > 0:
        tolerations += settings.gpu_tolerations
    if capacity is CapacityType.spot:
        tolerations += settings.spot_tolerations
    tolerations += [t.model_dump(exclude_none=True) for t in tolerations_spec]
    placement: dict[str, Any] = {
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        },
        "tolerations": tolerations,
    }
    if node_selector:
        placement["nodeSelector"] = dict(node_selector)
    return placement


def _resume_env(resume_from: str | None, digest: str | None, explicit: bool) -> list[dict[str, Any]]:
    """Where the pod resumes from and what it must verify there (the manifest's digest; a
    checkpoint of another run only when the user named it in ``spec.resumeFrom``)."""
    if not resume_from:
        return []
    env = [{"name": contract.ENV_RESUME_FROM, "value": resume_from}]
    if digest:
        env.append({"name": contract.ENV_RESUME_DIGEST, "value": digest})
    if explicit:
        env.append({"name": contract.ENV_RESUME_EXPLICIT, "value": "1"})
    return env


def _env(spec: TrainingRunSpec, incarnation: int, resume_env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_CONFIG, "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": contract.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": contract.ENV_NODE_NAME, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": contract.ENV_INCARNATION, "value": str(incarnation)},
        {"name": "FERMATA_LOG_FORMAT", "value": "json"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/hf"},
        {"name": contract.ENV_WORK_DIR, "value": f"{SCRATCH_DIR}/fermata"},
    ]
    env.extend(resume_env)
    secret = spec.storage.credentials_secret
    if secret:
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
            ("AWS_ENDPOINT_URL_S3", True),
            ("AWS_REGION", True),
        ):
            env.append(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}},
                }
            )
    return env


def kueue_labels(run: dict[str, Any]) -> dict[str, str]:
    """The run's Kueue labels (queue name, workload priority class), for its trainer pods.

    With them Kueue's plain-pod integration queues each trainer pod as a single-pod Workload
    (one pod per run, whatever its GPU count: no pod group). The ``kueue.x-k8s.io/admission``
    scheduling gate is *not* added here: Kueue's pod webhook adds it (with the
    ``kueue.x-k8s.io/managed`` label) exactly to the pods Kueue manages, and removes it on
    admission. A gate added by the operator would hold a pod forever wherever Kueue does not
    manage it (Kueue not installed, its pod integration off, or the namespace outside its
    ``managedJobsNamespaceSelector``)."""
    found = (run.get("metadata") or {}).get("labels") or {}
    return {k: str(found[k]) for k in KUEUE_LABELS if found.get(k)}


def preparation_pod_name(run_name: str, incarnation: int) -> str:
    return f"{run_name}-prep-{incarnation}"


def _prepared_env(manifest_digest: str | None, codes_key: str | None) -> list[dict[str, Any]]:
    """spec.preparation.mode Pod: what the training pod must find prepared (it never tokenizes)."""
    env: list[dict[str, Any]] = []
    if manifest_digest:
        env.append({"name": contract.ENV_PREPARED_MANIFEST_DIGEST, "value": manifest_digest})
    if codes_key:
        env.append({"name": contract.ENV_PREPARED_CODES_KEY, "value": codes_key})
    return env


def trainer_pod(
    run: dict[str, Any],
    spec: TrainingRunSpec,
    settings: OperatorSettings,
    *,
    incarnation: int,
    capacity: CapacityType,
    resume_from: str | None,
    resume_digest: str | None = None,
    resume_explicit: bool = False,
    prepared_manifest_digest: str | None = None,
    prepared_codes_key: str | None = None,
) -> dict[str, Any]:
    """The trainer pod for one incarnation; passes the `restricted` Pod Security level."""
    res = spec.resources
    limits: dict[str, str] = {"memory": res.memory}
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        limits[GPU_RESOURCE] = str(res.gpus)
        requests[GPU_RESOURCE] = str(res.gpus)
    env = _env(spec, incarnation, _resume_env(resume_from, resume_digest, resume_explicit))
    env.extend(_prepared_env(prepared_manifest_digest, prepared_codes_key))
    return _pod(
        run,
        spec,
        settings,
        name=pod_name(run["metadata"]["name"], incarnation),
        component="trainer",
        incarnation=incarnation,
        capacity=capacity,
        args=["run"],
        env=env,
        resources={"requests": requests, "limits": limits},
        scratch_size=res.scratch_size,
        placement=_placement(
            res.instance_types, capacity, res.gpus, list(res.tolerations), res.node_selector, settings
        ),
    )


def preparation_pod(
    run: dict[str, Any],
    spec: TrainingRunSpec,
    settings: OperatorSettings,
    *,
    incarnation: int,
) -> dict[str, Any]:
    """The preparation pod (spec.preparation.mode Pod): ``fermata-train prepare --tokenize`` on
    CPU capacity, with the trainer pod's image, config, ServiceAccount and security context."""
    prep = spec.preparation.resources
    return _pod(
        run,
        spec,
        settings,
        name=preparation_pod_name(run["metadata"]["name"], incarnation),
        component=PREPARER_COMPONENT,
        incarnation=incarnation,
        capacity=prep.capacity,
        args=["prepare", "--tokenize"],
        env=_env(spec, incarnation, []),
        resources={
            "requests": {"cpu": prep.cpu, "memory": prep.memory},
            "limits": {"memory": prep.memory},
        },
        scratch_size=prep.scratch_size,
        placement=_placement(
            prep.instance_types, prep.capacity, 0, list(prep.tolerations), prep.node_selector, settings
        ),
    )


#: ``app.kubernetes.io/component`` of preparation pods.
PREPARER_COMPONENT = "preparer"


def _pod(
    run: dict[str, Any],
    spec: TrainingRunSpec,
    settings: OperatorSettings,
    *,
    name: str,
    component: str,
    incarnation: int,
    capacity: CapacityType,
    args: list[str],
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    scratch_size: str,
    placement: dict[str, Any],
) -> dict[str, Any]:
    run_name = run["metadata"]["name"]
    meta = _meta(run, name, component)
    meta["labels"][LABEL_INCARNATION] = str(incarnation)
    meta["labels"].update(kueue_labels(run))
    meta["annotations"] = {
        ANNOTATION_CAPACITY: capacity.value,
        ANNOTATION_CONFIG: config_json(run, spec, settings),
    }
    meta["finalizers"] = [POD_FINALIZER]
    res = spec.resources
    uid = settings.trainer_uid
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": trainer_service_account(run_name, spec.service_account),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": res.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "trainer",
                "image": res.image,
                "imagePullPolicy": res.image_pull_policy,
                "command": ["fermata-train"],
                "args": args,
                "env": env,
                "resources": resources,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "scratch", "mountPath": SCRATCH_DIR},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [
            {
                "name": "config",
                "downwardAPI": {
                    "items": [
                        {
                            "path": CONFIG_KEY,
                            "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_CONFIG}']"},
                        }
                    ]
                },
            },
            {"name": "scratch", "emptyDir": {"sizeLimit": scratch_size}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        ],
        **placement,
    }
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    return podoverrides.apply(
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}, spec.pod
    )
