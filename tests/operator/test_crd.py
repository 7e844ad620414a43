"""The CRD in crds/ is generated from the models; drift fails the build."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field, ValidationError

import fermata_api as api
from fermata_api import spec as spec_models
from fermata_api.base import pattern_rule
from fermata_operator import crdgen

ROOT = Path(__file__).resolve().parents[2]


def test_crds_are_generated_from_the_models() -> None:
    assert crdgen.main(["--check"]) == 0, "run: python -m fermata_operator.crdgen"
    on_disk = (ROOT / "crds" / crdgen.CRD_FILENAME).read_text()
    assert on_disk == crdgen.render()


def _walk(schema: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, prop in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        if "description" not in prop and name not in {"apiVersion", "kind", "metadata"}:
            missing.append(here)
        missing += _walk(prop, here)
        if isinstance(prop.get("items"), dict):
            missing += _walk(prop["items"], here + "[]")
    return missing


def test_every_spec_and_status_field_is_documented() -> None:
    crd = yaml.safe_load(crdgen.render())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema, "") == []


def test_schema_is_structural() -> None:
    text = crdgen.render()
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title:", "'null'"):
        assert forbidden not in text, forbidden
    crd = yaml.safe_load(text)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for wanted in ("Phase", "Decision", "Progress", "Cost", "Budget", "Age"):
        assert wanted in columns
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["tr"] and names["categories"] == ["fermata"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in spec["x-kubernetes-validations"]]
    assert any("maxCostUSD" in r for r in rules)
    spot = spec["properties"]["spot"]
    assert "fallbackToOnDemandAfter <= self.maxInterruptions" in spot["x-kubernetes-validations"][0]["rule"]
    warn = spec["properties"]["budget"]["properties"]["warnAtFraction"]
    assert warn["maximum"] == 1 and warn["exclusiveMaximum"] is True


# ----------------------------------------------------------------------------- admission rules


def _spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(crdgen.render())
    spec: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def _rules(prop: dict[str, Any]) -> dict[str, str]:
    return {v["rule"]: v["message"] for v in prop.get("x-kubernetes-validations", [])}


def test_resource_quantities_are_checked_by_cel_at_admission() -> None:
    res = _spec_schema()["properties"]["resources"]["properties"]
    examples = {"cpu": "2, 500m or 1.5", "memory": "8Gi or 16000Mi", "scratchSize": "50Gi or 100G"}
    for name, example in examples.items():
        prop = res[name]
        assert prop["maxLength"] == 64 and prop["minLength"] == 1, name
        assert _rules(prop) == {
            "isQuantity(self)": f"resources.{name} must be a Kubernetes quantity such as {example}",
            "!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))": (
                f"resources.{name} must be greater than 0"
            ),
        }


def test_names_labels_and_images_carry_readable_rules_instead_of_bare_patterns() -> None:
    schema = _spec_schema()
    res = schema["properties"]["resources"]["properties"]
    secret = schema["properties"]["storage"]["properties"]["credentialsSecret"]
    checked = {
        "storage.credentialsSecret": (secret, 253),
        "resources.priorityClassName": (res["priorityClassName"], 253),
        "resources.image": (res["image"], 512),
        "resources.instanceTypes entries": (res["instanceTypes"]["items"], 63),
        "resources.tolerations[].key": (res["tolerations"]["items"]["properties"]["key"], 317),
        "resources.tolerations[].value": (res["tolerations"]["items"]["properties"]["value"], 63),
    }
    for field, (prop, max_length) in checked.items():
        assert prop["maxLength"] == max_length, field
        assert "pattern" not in prop, f"{field}: the pattern is a CEL rule with a message"
        rules = _rules(prop)
        assert any(r.startswith("self.matches('^") for r in rules), (field, rules)
        assert all(m.startswith(field) for m in rules.values()), (field, rules)
    selector = res["nodeSelector"]
    assert selector["maxProperties"] == 32 and selector["additionalProperties"]["maxLength"] == 63
    messages = list(_rules(selector).values())
    assert any(m.startswith("resources.nodeSelector keys must be Kubernetes label keys") for m in messages)
    assert any(
        m.startswith("resources.nodeSelector values must be Kubernetes label values") for m in messages
    )
    # The existing rules are kept.
    assert res["imagePullPolicy"]["pattern"] == "^(Always|IfNotPresent|Never)$"
    spec_messages = " ".join(v["message"] for v in schema["x-kubernetes-validations"])
    for kept in ("maxCostUSD cannot exceed", "bpmMin must be below", "storage.checkpoints is immutable"):
        assert kept in spec_messages


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, prop in (schema.get("properties") or {}).items():
        found += _nodes(prop, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), dict):
            found += _nodes(schema[key], path + suffix)
    return found


def test_every_cel_rule_has_a_message_and_a_bounded_cost() -> None:
    """The API server refuses a CRD whose rules' estimated cost is too high: every string a rule
    reads has a maxLength, every list or map it iterates a maxItems or maxProperties."""
    for path, node in _nodes(_spec_schema(), "spec"):
        for v in node.get("x-kubernetes-validations", []):
            assert v.get("message"), (path, v)
            rule = v["rule"]
            if node.get("type") == "string":
                assert "maxLength" in node, (path, rule)
            if rule.startswith("self.all("):
                assert "maxItems" in node or "maxProperties" in node, (path, rule)
                if node.get("type") == "object":
                    assert "maxLength" in node["additionalProperties"], (path, rule)


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (
            spec_models.DNS_SUBDOMAIN,
            ["s3-creds", "a", "s3.creds-v2", "0abc"],
            ["Bad_Name", "-a", "a-", "a..b", "", "UPPER", "with space"],
        ),
        (
            spec_models.LABEL_KEY,
            ["zone", "example.com/disk", "karpenter.sh/capacity-type", "a_b.C-d", "x" * 63],
            ["disk type", "", "-a", "a-", "example.com/", "/a", "Example.com/a", "x" * 64, "a/b/c"],
        ),
        (
            spec_models.LABEL_VALUE,
            ["", "ssd", "eu-west-1a", "ml_1", "A.b"],
            ["fast ssd", "-a", "a_", "x" * 64],
        ),
        (spec_models.INSTANCE_TYPE, ["g4dn.xlarge", "p4d.24xlarge", "x9"], ["G5 2XL", "g4dn.", ".a", ""]),
        (
            spec_models.IMAGE_REFERENCE,
            [
                "x",
                "busybox",
                "fermata/trainer:test",
                "ghcr.io/fermata-dev/fermata-trainer:0.1.0",
                "localhost:5000/ml/trainer",
                "registry.example.com/a/b@sha256:" + "0" * 64,
                "ghcr.io/a/b:v1@sha256:" + "f" * 64,
                "my_org/my__repo",
            ],
            [
                "ghcr.io/fermata-dev/fermata-trainer :test",
                "ghcr.io/Fermata/trainer",
                "trainer:",
                "trainer@sha256:short",
                " busybox",
                "a//b",
                "",
            ],
        ),
    ],
)
def test_patterns_accept_kubernetes_names_and_refuse_the_rest(
    pattern: str, good: list[str], bad: list[str]
) -> None:
    for value in good:
        assert re.fullmatch(pattern, value), value
    for value in bad:
        assert not re.fullmatch(pattern, value), value


def test_pydantic_enforces_the_same_patterns_in_python() -> None:
    ok = {"image": "ghcr.io/fermata/trainer:0.1.0", "nodeSelector": {"example.com/disk": "ssd"}}
    api.ResourcesSpec.model_validate(ok)
    for bad in (
        {"image": "ghcr.io/fermata/trainer :0.1.0"},
        {"nodeSelector": {"disk type": "ssd"}},
        {"nodeSelector": {"disk": "fast ssd"}},
        {"nodeSelector": {"a" * 254 + "/disk": "ssd"}},
        {"priorityClassName": "High"},
        {"instanceTypes": ["G5 2XL"]},
        {"tolerations": [{"key": "bad key"}]},
    ):
        with pytest.raises(ValidationError):
            api.ResourcesSpec.model_validate({**ok, **bad})
    with pytest.raises(ValidationError):
        api.StorageSpec.model_validate({"checkpoints": "s3://b/", "credentialsSecret": "Bad_Name"})
    assert api.Toleration.model_validate({"key": "", "operator": "Exists"}).key == ""


def test_pattern_rule_moves_the_pattern_into_cel() -> None:
    class M(api.ApiModel):
        name: str | None = Field(
            default=None, pattern="^[a-z]+$", json_schema_extra=pattern_rule("name: letters")
        )

    prop = M.model_json_schema()["properties"]["name"]
    assert "pattern" not in json.dumps(prop)
    assert prop["x-kubernetes-validations"] == [
        {"rule": "self.matches('^[a-z]+$')", "message": "name: letters"}
    ]
    with pytest.raises(ValidationError):
        M(name="A")

    class Escaped(api.ApiModel):
        name: str = Field(pattern=r"^a\.b$", json_schema_extra=pattern_rule("name"))

    with pytest.raises(ValueError, match="backslashes"):
        Escaped.model_json_schema()
