"""The trainer pod: placement, resources, config passing and the `restricted` security level."""

from __future__ import annotations

import json

from fermata_api import CapacityType, TrainerConfig, TrainingRunSpec
from fermata_api.meta import POD_FINALIZER
from fermata_operator import podspec
from fermata_operator.settings import OperatorSettings
from tests.operator.factories import run


def _pod(capacity: CapacityType = CapacityType.spot, **overrides: object) -> dict:
    r = run(**overrides)  # type: ignore[arg-type]
    s = TrainingRunSpec.model_validate(r["spec"])
    return podspec.trainer_pod(
        r, s, OperatorSettings(), incarnation=3, capacity=capacity, resume_from="s3://x/m.json"
    )


def test_spot_placement_resources_and_grace() -> None:
    pod = _pod(resources={"gpus": 2, "instanceTypes": ["g5.2xlarge", "g4dn.2xlarge"]})
    spec = pod["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    exprs = {e["key"]: e["values"] for t in terms for e in t["matchExpressions"]}
    assert exprs["karpenter.sh/capacity-type"] == ["spot"]
    assert exprs["eks.amazonaws.com/capacityType"] == ["SPOT"]
    assert exprs["node.kubernetes.io/instance-type"] == ["g5.2xlarge", "g4dn.2xlarge"]
    keys = {t["key"] for t in spec["tolerations"]}
    assert {"nvidia.com/gpu", "karpenter.sh/capacity-type", "eks.amazonaws.com/capacityType"} <= keys
    res = spec["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2" and res["requests"]["nvidia.com/gpu"] == "2"
    assert spec["terminationGracePeriodSeconds"] >= 120
    assert spec["restartPolicy"] == "Never"
    assert pod["metadata"]["name"] == "demo-3"
    assert pod["metadata"]["ownerReferences"][0]["controller"] is True
    assert POD_FINALIZER in pod["metadata"]["finalizers"]


def test_on_demand_pod_has_no_spot_toleration() -> None:
    spec = _pod(CapacityType.on_demand)["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms[0]["matchExpressions"][0]["values"] == ["on-demand"]
    assert "karpenter.sh/capacity-type" not in {t["key"] for t in spec["tolerations"]}


def test_restricted_security_context() -> None:
    spec = _pod()["spec"]
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    csc = spec["containers"][0]["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert all("hostPath" not in v for v in spec["volumes"])


def test_config_and_credentials_are_passed_explicitly() -> None:
    r = run()
    s = TrainingRunSpec.model_validate(r["spec"])
    pod = _pod()
    # The configuration rides on the pod (annotation → downward-API file): each pod keeps the
    # configuration it was created from.
    raw = pod["metadata"]["annotations"][podspec.ANNOTATION_CONFIG]
    assert raw == podspec.config_json(r, s, OperatorSettings())
    cfg = TrainerConfig.model_validate(json.loads(raw))
    assert cfg.run.name == "demo" and cfg.storage.checkpoints == "s3://ml-runs/demo/"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    item = volume["downwardAPI"]["items"][0]
    assert item["path"] == podspec.CONFIG_KEY
    assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{podspec.ANNOTATION_CONFIG}']"
    env = pod["spec"]["containers"][0]["env"]
    assert {e["name"]: e.get("value") for e in env}["FERMATA_CONFIG"] == "/etc/fermata/trainer.json"
    secret_refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in env
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secret_refs["AWS_ACCESS_KEY_ID"] == "s3-creds"
    assert not any("value" in e and "SECRET" in e["name"] for e in env)
    assert {e["name"]: e.get("value") for e in env}["FERMATA_RESUME_FROM"] == "s3://x/m.json"


def test_the_trainer_identity_is_the_namespaces_and_only_patches_status() -> None:
    sa, role, binding = podspec.trainer_rbac(run())
    assert [o["metadata"]["name"] for o in (sa, role, binding)] == ["fermata-trainer"] * 3
    assert all(podspec.is_identity(o) and "ownerReferences" not in o["metadata"] for o in (sa, role, binding))
    assert sa["automountServiceAccountToken"] is False
    # No reads, no spec: patch on the status subresource (the status-guard policy picks the run).
    assert role["rules"] == [
        {"apiGroups": ["fermata.dev"], "resources": ["trainingruns/status"], "verbs": ["patch"]}
    ]
    assert binding["roleRef"]["name"] == "fermata-trainer"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fermata-trainer", "namespace": "ml"}]
    assert _pod()["spec"]["serviceAccountName"] == "fermata-trainer"
    assert podspec.run_objects(None, "demo") == []


def test_resume_env_carries_the_digest_and_marks_an_explicit_foreign_start() -> None:
    r = run()
    s = TrainingRunSpec.model_validate(r["spec"])
    pod = podspec.trainer_pod(
        r,
        s,
        OperatorSettings(),
        incarnation=2,
        capacity=CapacityType.spot,
        resume_from="s3://b/p/checkpoints/step-000000010/manifest.json",
        resume_digest="sha256:ab",
    )
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["FERMATA_RESUME_FROM"].endswith("step-000000010/manifest.json")
    assert env["FERMATA_RESUME_DIGEST"] == "sha256:ab"
    assert "FERMATA_RESUME_EXPLICIT" not in env
    other = podspec.trainer_pod(
        r,
        s,
        OperatorSettings(),
        incarnation=0,
        capacity=CapacityType.spot,
        resume_from="s3://x/m.json",
        resume_explicit=True,
    )
    env = {e["name"]: e.get("value") for e in other["spec"]["containers"][0]["env"]}
    assert env["FERMATA_RESUME_EXPLICIT"] == "1" and "FERMATA_RESUME_DIGEST" not in env
