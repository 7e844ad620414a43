"""Admission against the real API server: what used to fail only at pod creation is refused
when the TrainingRun is applied, with a message that names the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import Runs, spec

pytestmark = pytest.mark.cluster

_IMAGE = "ghcr.io/fermata-dev/fermata-trainer:test"


def _causes(err: ApiException) -> list[dict[str, Any]]:
    body = json.loads(err.body)
    assert body["reason"] == "Invalid", body
    causes: list[dict[str, Any]] = body["details"]["causes"]
    return causes


@pytest.mark.parametrize(
    ("name", "patch", "field", "message"),
    [
        (
            "memory",
            {"resources": {"image": _IMAGE, "memory": "8 gigs"}},
            "spec.resources.memory",
            "resources.memory must be a Kubernetes quantity such as 8Gi or 16000Mi",
        ),
        (
            "memory-zero",
            {"resources": {"image": _IMAGE, "memory": "0"}},
            "spec.resources.memory",
            "resources.memory must be greater than 0",
        ),
        (
            "cpu",
            {"resources": {"image": _IMAGE, "cpu": "two cores"}},
            "spec.resources.cpu",
            "resources.cpu must be a Kubernetes quantity such as 2, 500m or 1.5",
        ),
        (
            "scratch",
            {"resources": {"image": _IMAGE, "scratchSize": "50 GB"}},
            "spec.resources.scratchSize",
            "resources.scratchSize must be a Kubernetes quantity such as 50Gi",
        ),
        (
            "secret",
            {"storage": {"checkpoints": "s3://ml-runs/test/", "credentialsSecret": "Bad_Name"}},
            "spec.storage.credentialsSecret",
            "storage.credentialsSecret must be a Secret name (a DNS-1123 subdomain",
        ),
        (
            "priority",
            {"resources": {"image": _IMAGE, "priorityClassName": "High Priority"}},
            "spec.resources.priorityClassName",
            "resources.priorityClassName must be a PriorityClass name",
        ),
        (
            "selector-key",
            {"resources": {"image": _IMAGE, "nodeSelector": {"disk type": "ssd"}}},
            "spec.resources.nodeSelector",
            "resources.nodeSelector keys must be Kubernetes label keys",
        ),
        (
            "selector-value",
            {"resources": {"image": _IMAGE, "nodeSelector": {"example.com/disk": "fast ssd"}}},
            "spec.resources.nodeSelector",
            "resources.nodeSelector values must be Kubernetes label values",
        ),
        (
            "toleration",
            {"resources": {"image": _IMAGE, "tolerations": [{"key": "bad key", "operator": "Exists"}]}},
            "spec.resources.tolerations[0].key",
            "resources.tolerations[].key must be empty or a Kubernetes label key",
        ),
        (
            "instance-type",
            {"resources": {"image": _IMAGE, "instanceTypes": ["g4dn.xlarge", "G5 2XL"]}},
            "spec.resources.instanceTypes[1]",
            "resources.instanceTypes entries must be instance type names such as g4dn.xlarge",
        ),
        (
            "image",
            {"resources": {"image": "ghcr.io/fermata-dev/fermata-trainer :test"}},
            "spec.resources.image",
            "resources.image must be an image reference such as ghcr.io/org/fermata-trainer:0.1.0",
        ),
        (
            "bpm-band",
            {"dataset": {"curation": {"bpm": {"min": 130, "max": 100}}}},
            "spec.dataset.curation.bpm",
            "bpm.min must not exceed bpm.max",
        ),
        (
            "durations",
            {"dataset": {"curation": {"minDurationSeconds": 30, "maxDurationSeconds": 10}}},
            "spec.dataset.curation.minDurationSeconds",
            "curation.minDurationSeconds must not exceed curation.maxDurationSeconds",
        ),
        (
            "uri-and-sources",
            {"dataset": {"sources": [{"name": "a", "source": "manifest", "uri": "s3://d/a.jsonl"}]}},
            "spec.dataset",
            "set dataset.uri (one source) or dataset.sources (several), not both",
        ),
    ],
)
def test_bad_values_are_refused_at_admission_naming_the_field(
    runs: Runs, name: str, patch: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ApiException) as err:
        runs.create(f"bad-{name}", spec(**patch))
    assert err.value.status == 422, err.value.body
    causes = _causes(err.value)
    # Exactly the one broken rule, reported on the field with its own message (no regex dump).
    assert len(causes) == 1, causes
    assert causes[0]["field"] == field, causes
    assert message in causes[0]["message"], causes
    assert "should match" not in err.value.body
    assert not runs.exists(f"bad-{name}")


def test_a_spec_using_every_checked_field_is_accepted(runs: Runs) -> None:
    good = spec(
        resources={
            "image": "registry.example.com:5000/ml/fermata-trainer:0.1.0@sha256:" + "a" * 64,
            "cpu": "1500m",
            "memory": "16000Mi",
            "scratchSize": "100G",
            "instanceTypes": ["g4dn.xlarge", "g5.2xlarge"],
            "nodeSelector": {
                "example.com/disk": "ssd",
                "zone": "",
                "topology.kubernetes.io/zone": "eu-west-1a",
            },
            "tolerations": [
                {"key": "example.com/gpu-team", "operator": "Equal", "value": "ml_1", "effect": "NoSchedule"},
                {"operator": "Exists"},
            ],
            "priorityClassName": "training.low",
        },
        storage={"checkpoints": "s3://ml-runs/test/", "credentialsSecret": "s3-creds.v2"},
    )
    runs.create("good", good)
    stored = runs.get("good")["spec"]
    assert stored["resources"]["memory"] == "16000Mi"
    assert stored["resources"]["nodeSelector"]["example.com/disk"] == "ssd"
    assert stored["storage"]["credentialsSecret"] == "s3-creds.v2"
    # Plain images without a registry, as the other tests use, stay valid.
    runs.create("plain", spec(resources={"image": "busybox"}))
    runs.delete("good")
    runs.delete("plain")


def test_curation_and_weighted_sources_are_accepted_and_mixed_weights_refused(runs: Runs) -> None:
    curation = {
        "minDurationSeconds": 5,
        "maxDurationSeconds": 600,
        "minSampleRate": 44100,
        "minBitrateKbps": 320,
        "bpm": {"min": 100, "max": 130},
        "keys": ["A minor", "F# minor"],
        "silence": {"action": "trim"},
        "loudness": {"targetLufs": -14},
    }
    sources = [
        {"name": "classic", "source": "manifest", "uri": "s3://d/classic.jsonl", "weight": 60},
        {"name": "private-school", "source": "manifest", "uri": "s3://d/ps.jsonl", "weight": 30},
        {"name": "fusion", "source": "manifest", "uri": "s3://d/fusion.jsonl", "weight": 10},
    ]
    runs.create(
        "curated", spec(dataset={"uri": "", "sources": sources, "curation": curation})
    )  # spec() sets a uri
    stored = runs.get("curated")["spec"]["dataset"]
    assert stored["curation"]["silence"]["thresholdDb"] == -50 and stored["curation"]["dedupe"] is True
    runs.create(
        "mixed",
        spec(
            dataset={
                "source": "manifest",
                "uri": "s3://d/m.jsonl",
                "mix": {"by": "tier", "weights": {"gold": 60, "silver": 30, "bronze": 10}},
            }
        ),
    )
    with pytest.raises(ApiException) as err:
        runs.create(
            "half-weighted",
            spec(dataset={"uri": "", "sources": [sources[0], {**sources[1], "weight": None}]}),
        )
    causes = _causes(err.value)
    assert [c["field"] for c in causes] == ["spec.dataset.sources"], causes
    assert "give every dataset.sources entry a weight, or none" in causes[0]["message"]
    runs.delete("curated")
    runs.delete("mixed")
