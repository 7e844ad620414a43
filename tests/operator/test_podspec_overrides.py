"""spec.serviceAccount and spec.pod merged into the trainer's objects: additions only, the
operator's own labels, variables, volumes, mounts and placement always win."""

from __future__ import annotations

from typing import Any

from fermata_api import CapacityType, TrainingRunSpec
from fermata_api.meta import LABEL_RUN, POD_FINALIZER
from fermata_operator import podspec
from fermata_operator.settings import OperatorSettings
from tests.operator.factories import run

OVERRIDES: dict[str, Any] = {
    "labels": {"team": "audio", "fermata.dev/run": "other", "app.kubernetes.io/name": "x"},
    "annotations": {"example.com/cost-center": "42", "fermata.dev/capacity": "on-demand"},
    "env": [
        {"name": "WANDB_PROJECT", "value": "amapiano"},
        {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "api"}}},
        {"name": "FERMATA_RESUME_FROM", "value": "s3://evil/manifest.json"},
        {"name": "HF_HOME", "value": "/elsewhere"},
    ],
    "envFrom": [{"configMapRef": {"name": "team-env"}}],
    "volumes": [
        {"name": "prompts", "configMap": {"name": "prompts"}},
        {"name": "config", "emptyDir": {}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
    ],
    "volumeMounts": [
        {"name": "prompts", "mountPath": "/etc/prompts", "readOnly": True},
        {"name": "data", "mountPath": "/etc/fermata"},
        {"name": "config", "mountPath": "/srv/config"},
    ],
    "imagePullSecrets": [{"name": "registry"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}
                        ]
                    }
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 10,
                    "preference": {
                        "matchExpressions": [{"key": "example.com/fast", "operator": "Exists"}],
                    },
                }
            ],
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"team": "audio"}},
        }
    ],
}


def _pod(resume_from: str | None = None, **overrides: Any) -> dict[str, Any]:
    r = run(**overrides)
    s = TrainingRunSpec.model_validate(r["spec"])
    return podspec.trainer_pod(
        r, s, OperatorSettings(), incarnation=1, capacity=CapacityType.spot, resume_from=resume_from
    )


def test_a_run_without_overrides_is_unchanged() -> None:
    pod = _pod()
    assert "imagePullSecrets" not in pod["spec"] and "topologySpreadConstraints" not in pod["spec"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["config", "scratch", "dshm"]
    assert "envFrom" not in pod["spec"]["containers"][0]
    assert pod["spec"]["serviceAccountName"] == "fermata-trainer"


def test_additions_land_and_the_operators_own_keys_win() -> None:
    pod = _pod(pod=OVERRIDES)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"]["team"] == "audio"
    assert meta["labels"][LABEL_RUN] == "demo" and meta["labels"]["app.kubernetes.io/name"] == "fermata"
    annotations = {k: v for k, v in meta["annotations"].items() if k != podspec.ANNOTATION_CONFIG}
    assert annotations == {"fermata.dev/capacity": "spot", "example.com/cost-center": "42"}
    assert meta["finalizers"] == [POD_FINALIZER]
    c = spec["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["WANDB_PROJECT"]["value"] == "amapiano"
    assert env["API_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "tokens", "key": "api"}}
    assert env["HF_HOME"]["value"] == "/tmp/hf"
    assert [e["name"] for e in c["env"]].count("HF_HOME") == 1
    # envFrom cannot supply a contract variable the operator leaves unset: it is pinned empty.
    assert env["FERMATA_RESUME_FROM"]["value"] == ""
    assert c["envFrom"] == [{"configMapRef": {"name": "team-env"}}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["downwardAPI"]["items"][0]["path"] == "trainer.json"
    assert volumes["prompts"]["configMap"] == {"name": "prompts"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/fermata"] == "config" and mounts["/etc/prompts"] == "prompts"
    assert "/srv/config" not in mounts
    assert len(c["volumeMounts"]) == 4
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    # GPU limits, security context stay the operator's.
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_an_operator_set_resume_is_never_replaced() -> None:
    env = _pod(resume_from="s3://ml-runs/demo/m.json", pod=OVERRIDES)["spec"]["containers"][0]["env"]
    values = [e.get("value") for e in env if e["name"] == "FERMATA_RESUME_FROM"]
    assert values == ["s3://ml-runs/demo/m.json"]


def test_required_node_affinity_is_anded_with_the_operators_placement() -> None:
    extra = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                        {
                            "matchExpressions": [
                                {"key": "zone", "operator": "In", "values": ["b"]},
                                {
                                    "key": "karpenter.sh/capacity-type",
                                    "operator": "In",
                                    "values": ["on-demand"],
                                },
                            ]
                        },
                    ]
                }
            }
        }
    }
    na = _pod(pod=extra)["spec"]["affinity"]["nodeAffinity"]
    terms = na["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 4  # two operator terms (Karpenter, EKS) x two user terms
    for term in terms:
        exprs = {(e["key"], tuple(e.get("values") or ())) for e in term["matchExpressions"]}
        assert ("node.kubernetes.io/instance-type", ("g4dn.xlarge",)) in exprs
        assert ("karpenter.sh/capacity-type", ("on-demand",)) not in exprs
        assert {("zone", ("a",)), ("zone", ("b",))} & exprs
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in na


def test_preferred_node_affinity_is_added() -> None:
    na = _pod(pod=OVERRIDES)["spec"]["affinity"]["nodeAffinity"]
    assert na["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 10
    terms = na["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert all(t["matchExpressions"][-1]["key"] == "topology.kubernetes.io/zone" for t in terms)


def test_service_account_annotations_land_on_the_per_run_account() -> None:
    arn = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/fermata"}
    r = run(serviceAccount={"annotations": arn})
    s = TrainingRunSpec.model_validate(r["spec"])
    *shared, sa, binding = podspec.trainer_rbac(r, s.service_account)
    assert all(podspec.is_identity(o) for o in shared)
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["annotations"] == arn
    assert sa["metadata"]["name"] == "demo-trainer" and sa["metadata"]["ownerReferences"][0]["name"] == "demo"
    assert sa["automountServiceAccountToken"] is False
    assert binding["subjects"][0]["name"] == "demo-trainer"
    assert binding["roleRef"]["name"] == "fermata-trainer"
    assert podspec.run_objects(s.service_account, "demo") == [
        ("RoleBinding", "demo-trainer"),
        ("ServiceAccount", "demo-trainer"),
    ]
    pod = podspec.trainer_pod(
        r, s, OperatorSettings(), incarnation=0, capacity=CapacityType.spot, resume_from=None
    )
    assert pod["spec"]["serviceAccountName"] == "demo-trainer"
    assert pod["spec"]["automountServiceAccountToken"] is True


def test_a_named_service_account_is_bound_not_created() -> None:
    r = run(serviceAccount={"name": "ml-identity"})
    s = TrainingRunSpec.model_validate(r["spec"])
    objs = podspec.trainer_rbac(r, s.service_account)
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding", "RoleBinding"]
    binding = objs[-1]
    assert binding["metadata"]["name"] == "demo-trainer" and not podspec.is_identity(binding)
    assert binding["roleRef"]["name"] == "fermata-trainer"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-identity", "namespace": "ml"}]
    assert podspec.run_objects(s.service_account, "demo") == [("RoleBinding", "demo-trainer")]
    pod = podspec.trainer_pod(
        r, s, OperatorSettings(), incarnation=0, capacity=CapacityType.spot, resume_from=None
    )
    assert pod["spec"]["serviceAccountName"] == "ml-identity"
    assert pod["spec"]["automountServiceAccountToken"] is True


def test_no_static_keys_without_a_credentials_secret() -> None:
    r = run(serviceAccount={"name": "ml-identity"})
    del r["spec"]["storage"]["credentialsSecret"]
    s = TrainingRunSpec.model_validate(r["spec"])
    pod = podspec.trainer_pod(
        r, s, OperatorSettings(), incarnation=0, capacity=CapacityType.spot, resume_from=None
    )
    names = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert not {n for n in names if n.startswith("AWS_")}, names
