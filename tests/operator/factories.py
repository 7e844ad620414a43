"""Builders of TrainingRun / Pod / Node dicts as the API server returns them (for pure tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fermata_api import CapacityType, TrainingRunSpec
from fermata_operator import podspec
from fermata_operator.settings import OperatorSettings

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "dataset": {"uri": "s3://datasets/magnatagatune/"},
        "resources": {"image": "ghcr.io/fermata/trainer:0.1.0", "instanceTypes": ["g4dn.xlarge"]},
        "budget": {"maxUSD": 600, "warnAtFraction": 0.8},
        "storage": {"checkpoints": "s3://ml-runs/demo/", "credentialsSecret": "s3-creds"},
        "training": {"batchSize": 8},
        # Most planner tests are about the training pod: tests/operator/test_preparation.py covers
        # the default (a preparation pod first).
        "preparation": {"mode": "Trainer"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def run(name: str = "demo", status: dict[str, Any] | None = None, **spec_overrides: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fermata.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": "00000000-0000-0000-0000-000000000001",
            "generation": 1,
            "resourceVersion": "10",
            "creationTimestamp": iso(T0),
        },
        "spec": spec(**spec_overrides),
        "status": status or {},
    }


def node(
    name: str,
    capacity: str = "spot",
    instance_type: str = "g4dn.xlarge",
    taints: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "node.kubernetes.io/instance-type": instance_type,
                "karpenter.sh/capacity-type": capacity,
            },
        },
        "spec": {"taints": taints or []},
    }


def pod_for(
    r: dict[str, Any], incarnation: int = 0, capacity: CapacityType = CapacityType.spot
) -> dict[str, Any]:
    s = TrainingRunSpec.model_validate(r["spec"])
    p = podspec.trainer_pod(
        r, s, OperatorSettings(), incarnation=incarnation, capacity=capacity, resume_from=None
    )
    p["metadata"]["creationTimestamp"] = iso(T0)
    p["status"] = {"phase": "Pending"}
    return p


def running(p: dict[str, Any], node_name: str, started: datetime) -> dict[str, Any]:
    p["spec"]["nodeName"] = node_name
    p["status"] = {
        "phase": "Running",
        "startTime": iso(started),
        "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": iso(started)}}}],
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": iso(started)}],
    }
    return p


def terminated(
    p: dict[str, Any], exit_code: int, finished: datetime, reason: str = "Error", phase: str | None = None
) -> dict[str, Any]:
    started = p["status"].get("startTime", iso(finished - timedelta(hours=1)))
    p["status"] = {
        "phase": phase or ("Succeeded" if exit_code == 0 else "Failed"),
        "startTime": started,
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason,
                        "startedAt": started,
                        "finishedAt": iso(finished),
                    }
                },
            }
        ],
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": iso(finished)}],
    }
    return p


def progress(step: int, total: int, at: datetime, pod: str = "demo-0", **extra: Any) -> dict[str, Any]:
    return {
        "state": "Training",
        "heartbeatTime": iso(at),
        "podName": pod,
        "step": step,
        "totalSteps": total,
        **extra,
    }


# -- small builders for the policy unit tests (tests/operator/policies) ----------------------------


def training_spec(**overrides: Any) -> TrainingRunSpec:
    """A validated spec (the dict of :func:`spec` with ``overrides``)."""
    return TrainingRunSpec.model_validate(spec(**overrides))


def deleting(p: dict[str, Any], at: datetime) -> dict[str, Any]:
    """The pod with a deletionTimestamp (``at``: the deletion deadline the API server sets)."""
    p["metadata"]["deletionTimestamp"] = iso(at)
    return p


def with_condition(
    p: dict[str, Any], ctype: str, status: str = "True", reason: str | None = None, at: datetime | None = None
) -> dict[str, Any]:
    """The pod with one more status condition (e.g. DisruptionTarget)."""
    c: dict[str, Any] = {"type": ctype, "status": status}
    if reason is not None:
        c["reason"] = reason
    if at is not None:
        c["lastTransitionTime"] = iso(at)
    p["status"].setdefault("conditions", []).append(c)
    return p


def waiting(
    p: dict[str, Any], reason: str, message: str | None = None, node_name: str | None = "n1"
) -> dict[str, Any]:
    """A Pending pod whose trainer container waits (ImagePullBackOff, CreateContainerConfigError ...)."""
    if node_name:
        p["spec"]["nodeName"] = node_name
    state: dict[str, Any] = {"reason": reason}
    if message is not None:
        state["message"] = message
    p["status"] = {
        "phase": "Pending",
        "containerStatuses": [{"name": "trainer", "state": {"waiting": state}}],
    }
    return p
