"""Property-based fuzzing of TrainingRun specs against the real API server and the operator.

Specs are drawn from the CRD's own OpenAPI schema — mostly valid values, sometimes a field out of
range, of the wrong type, unknown, or missing — and some are arbitrary JSON. The API server must
either accept a spec or reject it with a 422 whose message names the offending field path; the
operator, running throughout, must never crash on an accepted spec (no traceback, no "reconcile
crashed") nor hot-loop (its reconcile count stays bounded once the runs are created).
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.request
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from fermata_dev.cluster import free_port
from fermata_dev.kubelet import LocalKubelet
from fermata_operator.crdgen import render
from tests.e2e.conftest import OperatorProcess, Runs

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]

EXAMPLES = 60
RESYNC = 30.0
QUIET = 6.0
SPEC_SCHEMA: dict[str, Any] = yaml.safe_load(render())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
    "properties"
]["spec"]
#: A field path in the API server's message: spec.budget.maxUSD, spec.gates[0].at, ...
FIELD_PATH = re.compile(r"\bspec(\.[A-Za-z]+|\[\d+\])*")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=12)
)
arbitrary_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _wrong_type(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    others = {
        "object": st.text(max_size=5) | st.integers(),
        "array": st.text(max_size=5) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        "string": st.integers() | st.booleans() | st.lists(st.integers(), max_size=2),
        "integer": st.text(max_size=5) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans(),
        "number": st.text(max_size=5) | st.booleans(),
        "boolean": st.text(max_size=5) | st.integers(),
    }
    return others.get(kind, arbitrary_json)


def _out_of_range(schema: dict[str, Any]) -> st.SearchStrategy[Any] | None:
    kind = schema.get("type")
    if kind in ("integer", "number"):
        bad = []
        if "minimum" in schema:
            bad.append(st.just(schema["minimum"] - 1) | st.just(schema["minimum"]))
        if "maximum" in schema:
            bad.append(st.just(schema["maximum"] + 1) | st.just(schema["maximum"]))
        return st.one_of(bad) if bad else None
    if kind == "string":
        if "enum" in schema:
            return st.text(max_size=10).filter(lambda s: s not in schema["enum"])
        if "pattern" in schema:
            return st.text(max_size=10)
        if schema.get("minLength"):
            return st.just("")
    if kind == "array" and "maxItems" in schema:
        return st.lists(
            _valid(schema["items"], 2), min_size=schema["maxItems"] + 1, max_size=schema["maxItems"] + 1
        )
    return None


#: A rule like ``self.matches('^...$')`` (the CRD's readable form of a pattern).
MATCHES_RULE = re.compile(r"^self\.matches\('(.*)'\)$")
QUANTITY = st.from_regex(r"[1-9][0-9]{0,3}(\.[0-9])?(m|k|M|G|Ki|Mi|Gi)?", fullmatch=True)
#: Label keys and values (what the nodeSelector and toleration rules accept).
LABEL_KEY = st.from_regex(r"([a-z]{1,5}\.[a-z]{1,5}/)?[a-z][a-z0-9]{0,8}", fullmatch=True)
LABEL_VALUE = st.from_regex(r"([a-z0-9]([a-z0-9.-]{0,8}[a-z0-9])?)?", fullmatch=True)


def _rules(schema: dict[str, Any]) -> list[str]:
    return [str(v.get("rule", "")) for v in schema.get("x-kubernetes-validations") or []]


def _valid_string(schema: dict[str, Any]) -> st.SearchStrategy[Any] | None:
    """A string the field's CEL rules accept (its pattern, a quantity, a label key), if any."""
    for rule in _rules(schema):
        if "isQuantity(self)" in rule:
            return QUANTITY
        found = MATCHES_RULE.match(rule)
        if found:
            return st.from_regex(found.group(1).replace("\\\\", "\\"), fullmatch=True).filter(
                lambda s: 0 < len(s) < 40
            )
    return None


def _one_dataset_origin(dataset: dict[str, Any]) -> dict[str, Any]:
    """The dataset's either-or CEL rules, kept (as a user would): ``uri`` or ``sources``, every
    source weighted or none, ``mix`` only for one manifest — else nearly every draw is refused."""
    out = dict(dataset)
    sources = out.get("sources")
    if isinstance(sources, list) and sources:
        out.pop("uri", None)
        out.pop("mix", None)
        if any(isinstance(x, dict) and "weight" not in x for x in sources):
            out["sources"] = [
                {k: v for k, v in x.items() if k != "weight"} if isinstance(x, dict) else x for x in sources
            ]
    else:
        out.pop("sources", None)
        if not out.get("uri"):
            out["uri"] = "s3://datasets/mtat"
        if out.get("source") != "manifest":
            out.pop("mix", None)
    return out


def _valid(schema: dict[str, Any], depth: int, mutate: bool = False) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "string" and (ruled := _valid_string(schema)) is not None:
        return ruled
    if kind == "object":
        props: dict[str, Any] = schema.get("properties") or {}
        if not props:
            extra = schema.get("additionalProperties") or {"type": "string"}
            if _rules(schema):  # a label map (nodeSelector): label keys and values
                return st.dictionaries(LABEL_KEY, LABEL_VALUE, max_size=2)
            return st.dictionaries(
                st.from_regex(r"[a-z][a-z0-9./-]{0,10}", fullmatch=True), _valid(extra, depth + 1), max_size=2
            )
        required = set(schema.get("required") or [])
        drawn = st.fixed_dictionaries(
            {k: _field(v, depth + 1, mutate) for k, v in props.items() if k in required},
            optional={k: _field(v, depth + 1, mutate) for k, v in props.items() if k not in required},
        )
        return drawn.map(_one_dataset_origin) if {"uri", "sources"} <= set(props) else drawn
    if kind == "array":
        lo = schema.get("minItems", 0)
        return st.lists(
            _field(schema["items"], depth + 1, mutate),
            min_size=lo,
            max_size=max(lo, min(3, schema.get("maxItems", 3))),
        )
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda s: len(s) < 40)
        return st.text(
            st.characters(codec="utf-8", exclude_categories=("Cs",)),
            min_size=schema.get("minLength", 0),
            max_size=16,
        )
    if kind == "integer":
        return st.integers(schema.get("minimum", 0), schema.get("maximum", 10**6))
    if kind == "number":
        lo, hi = schema.get("minimum", 0.0), schema.get("maximum", 1e6)
        return st.floats(
            lo,
            hi,
            exclude_min=bool(schema.get("exclusiveMinimum")),
            exclude_max=bool(schema.get("exclusiveMaximum")),
            allow_nan=False,
        )
    if kind == "boolean":
        return st.booleans()
    return arbitrary_json


def _field(schema: dict[str, Any], depth: int, mutate: bool) -> st.SearchStrategy[Any]:
    """A valid value; when mutating, now and then one out of range or of the wrong type."""
    valid = _valid(schema, depth, mutate)
    if not mutate:
        return valid
    bad = [_wrong_type(schema)]
    oor = _out_of_range(schema)
    if oor is not None:
        bad.append(oor)
    return st.integers(0, 11).flatmap(lambda k: st.one_of(bad) if k == 0 else valid)


def _with_unknown_field(spec: Any) -> st.SearchStrategy[Any]:
    if not isinstance(spec, dict):
        return st.just(spec)
    return st.builds(
        lambda k, v: {**spec, k: v}, st.from_regex(r"[a-z][A-Za-z]{0,8}", fullmatch=True), arbitrary_json
    )


schema_specs = _valid(SPEC_SCHEMA, 0)
specs = st.one_of(
    schema_specs,
    schema_specs.flatmap(_with_unknown_field),
    _valid(SPEC_SCHEMA, 0, mutate=True),
    arbitrary_json,
    st.dictionaries(st.sampled_from(sorted(SPEC_SCHEMA["properties"])), arbitrary_json, max_size=4),
)


def _reconciles(port: int) -> float:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://127.0.0.1:{port}/metrics", timeout=5
    ) as resp:
        text = resp.read().decode()
    match = re.search(r"^fermata_reconcile_duration_seconds_count (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_fuzzed_specs_are_accepted_or_rejected_readably_and_never_crash_the_operator(
    runs: Runs, operator_factory: Any, kubelet: LocalKubelet
) -> None:
    port = free_port()
    op: OperatorProcess = operator_factory(
        runs.ns, FERMATA_RESYNC_SECONDS=str(RESYNC), FERMATA_METRICS_PORT=str(port)
    )
    counter = itertools.count()
    outcomes: dict[str, int] = {"accepted": 0, "rejected": 0}
    unreadable: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(spec=specs)
    def create(spec: Any) -> None:
        name = f"fz-{next(counter)}"
        body = {
            "apiVersion": "fermata.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": name},
            "spec": spec,
        }
        try:
            runs.custom.create_namespaced_custom_object(
                "fermata.dev", "v1alpha1", runs.ns, "trainingruns", body
            )
        except ApiException as exc:
            outcomes["rejected"] += 1
            message = json.loads(exc.body or "{}").get("message", "") if exc.body else ""
            if exc.status != 422 or not FIELD_PATH.search(message):
                unreadable.append(
                    f"HTTP {exc.status} for {json.dumps(spec)[:300]}: {message[:300] or exc.body}"
                )
            return
        outcomes["accepted"] += 1

    create()
    accepted = outcomes["accepted"]
    assert not unreadable, "\n".join(unreadable[:10])
    assert accepted >= 5 and outcomes["rejected"] >= 5, outcomes  # both sides were exercised
    # Give the operator time to act on every accepted run, then watch it sit still.
    time.sleep(4)
    first = _reconciles(port)
    time.sleep(QUIET)
    during = _reconciles(port) - first
    log = op.log()
    assert op.proc is not None and op.proc.poll() is None, log[-3000:]
    assert "Traceback" not in log and "reconcile crashed" not in log, log[-6000:]
    # Quiet state: each run reconciles about once per resync (30 s), a run whose writes the API
    # refuses backs off exponentially (up to 60 s). A hot loop would show hundreds here.
    assert during <= 2 * accepted + 10, (during, outcomes, log[-3000:])
    # Known gap (reported, not failed on): some accepted specs make objects the API refuses
    # (free-form quantities, Secret names); the operator backs off and retries. List them.
    refused = {
        record.get("message", "")[:160]
        for record in (json.loads(line) for line in log.splitlines() if line.startswith("{"))
        if record.get("event") == "reconcile failed"
    }
    print(f"{outcomes}; {int(first)} reconciles to settle, {int(during)} in a quiet {QUIET:.0f} s")
    for message in sorted(refused):
        print(f"  accepted but refused downstream: {message}")
