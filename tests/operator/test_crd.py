"""The CRD in crds/ is generated from the models; drift fails the build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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
