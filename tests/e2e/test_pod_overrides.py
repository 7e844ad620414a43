"""spec.serviceAccount and spec.pod against the real API server: forbidden overrides are refused
at admission, allowed ones reach the trainer pod the operator creates."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_dev.kubelet import LocalKubelet
from tests.e2e.conftest import GROUP, PLURAL, VERSION, OperatorProcess, Runs, spec, wait_for

pytestmark = pytest.mark.cluster

ROLE_ARN = "arn:aws:iam::123456789012:role/fermata-trainer"


def _refusal(runs: Runs, name: str, body: dict[str, Any], strict: bool) -> str:
    """The API server's refusal; ``strict``: as kubectl sends it (unknown fields are errors, not
    silently pruned)."""
    run = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": body,
    }
    with pytest.raises(ApiException) as err:
        runs.custom.create_namespaced_custom_object(
            GROUP, VERSION, runs.ns, PLURAL, run, field_validation="Strict" if strict else "Warn"
        )
    assert err.value.status in (400, 422), err.value.body
    assert not runs.exists(name)
    return str(json.loads(err.value.body)["message"])


@pytest.mark.parametrize(
    ("name", "overrides", "message", "strict"),
    [
        (
            "host-path",
            {"pod": {"volumes": [{"name": "host", "hostPath": {"path": "/var/run"}}]}},
            "(hostPath and other volume types are not allowed)",
            False,
        ),
        (
            "host-path-strict",
            {"pod": {"volumes": [{"name": "host", "hostPath": {"path": "/var/run"}}]}},
            'unknown field "spec.pod.volumes[0].hostPath"',
            True,
        ),
        (
            "fermata-env",
            {"pod": {"env": [{"name": "FERMATA_RESUME_FROM", "value": "s3://x/manifest.json"}]}},
            "pod.env[].name may not be FERMATA_* or HF_HOME, HOME, PYTHONUNBUFFERED",
            False,
        ),
        (
            "reserved-volume",
            {"pod": {"volumes": [{"name": "config", "emptyDir": {}}]}},
            "pod.volumes[].name may not be config, scratch, dshm",
            False,
        ),
        (
            "config-mount",
            {
                "pod": {
                    "volumes": [{"name": "extra", "emptyDir": {}}],
                    "volumeMounts": [{"name": "extra", "mountPath": "/etc/fermata"}],
                }
            },
            "pod.volumeMounts[].mountPath may not be",
            False,
        ),
        (
            "fermata-label",
            {"pod": {"labels": {"fermata.dev/run": "someone-else"}}},
            "pod.labels may not use the fermata.dev domain",
            False,
        ),
        (
            "privileged",
            {"pod": {"securityContext": {"privileged": True}}},
            'unknown field "spec.pod.securityContext"',
            True,
        ),
        (
            "both-identities",
            {
                "serviceAccount": {
                    "name": "ml-identity",
                    "annotations": {"eks.amazonaws.com/role-arn": ROLE_ARN},
                }
            },
            "set either serviceAccount.name",
            False,
        ),
    ],
)
def test_forbidden_overrides_are_refused_at_admission(
    runs: Runs, name: str, overrides: dict[str, Any], message: str, strict: bool
) -> None:
    text = _refusal(runs, f"bad-{name}", spec(**overrides), strict)
    assert message in text, text


def test_the_operator_creates_the_pod_with_the_overrides(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.core.create_namespaced_config_map(runs.ns, {"metadata": {"name": "prompts"}, "data": {"a.txt": "x"}})
    pod_overrides = {
        "labels": {"team": "audio"},
        "annotations": {"example.com/cost-center": "42"},
        "env": [{"name": "WANDB_PROJECT", "value": "amapiano"}],
        "volumes": [{"name": "prompts", "configMap": {"name": "prompts"}}],
        "volumeMounts": [{"name": "prompts", "mountPath": "/etc/prompts", "readOnly": True}],
        "imagePullSecrets": [{"name": "registry"}],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"team": "audio"}},
            }
        ],
    }
    runs.create(
        "tuned",
        spec(pod=pod_overrides, serviceAccount={"annotations": {"eks.amazonaws.com/role-arn": ROLE_ARN}}),
    )
    pod = wait_for(lambda: runs.pods("tuned"), timeout=30, what="tuned pod")[0]
    assert pod.metadata.labels["team"] == "audio" and pod.metadata.labels["fermata.dev/run"] == "tuned"
    assert pod.metadata.annotations["example.com/cost-center"] == "42"
    container = pod.spec.containers[0]
    assert {e.name: e.value for e in container.env}["WANDB_PROJECT"] == "amapiano"
    assert not [e.name for e in container.env if e.name.startswith("AWS_")]
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    assert mounts["/etc/prompts"] == "prompts" and mounts["/etc/fermata"] == "config"
    assert [s.name for s in pod.spec.image_pull_secrets] == ["registry"]
    assert pod.spec.topology_spread_constraints[0].topology_key == "topology.kubernetes.io/zone"
    assert pod.spec.service_account_name == "tuned-trainer"
    sa = runs.core.read_namespaced_service_account("tuned-trainer", runs.ns)
    assert sa.metadata.annotations == {"eks.amazonaws.com/role-arn": ROLE_ARN}


def test_a_named_service_account_runs_the_pod_and_gets_the_status_role(
    runs: Runs, operator: OperatorProcess, kubelet: LocalKubelet
) -> None:
    runs.core.create_namespaced_service_account(runs.ns, {"metadata": {"name": "ml-identity"}})
    runs.create("named", spec(serviceAccount={"name": "ml-identity"}))
    pod = wait_for(lambda: runs.pods("named"), timeout=30, what="named pod")[0]
    assert pod.spec.service_account_name == "ml-identity"
    assert pod.spec.automount_service_account_token is True
    rbac = client.RbacAuthorizationV1Api(runs.api)
    binding = rbac.read_namespaced_role_binding("named-trainer", runs.ns)
    assert binding.role_ref.name == "fermata-trainer"
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
        ("ServiceAccount", "ml-identity", runs.ns)
    ]
    # The operator made no ServiceAccount of its own, and left the named one as it was.
    with pytest.raises(ApiException) as err:
        runs.core.read_namespaced_service_account("named-trainer", runs.ns)
    assert err.value.status == 404
    assert not runs.core.read_namespaced_service_account("ml-identity", runs.ns).metadata.owner_references
