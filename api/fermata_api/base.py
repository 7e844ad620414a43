"""Building blocks of the TrainingRun API: the wire naming, CEL rules, durations and timestamps."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict


def wire_name(field: str) -> str:
    """snake_case → the camelCase Kubernetes users expect (``max_usd`` → ``maxUSD``)."""
    return re.sub(r"Usd(?=[A-Z]|$)", "USD", to_camel(field))


class ApiModel(BaseModel):
    """camelCase on the wire (as Kubernetes users expect), snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=wire_name,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def cel(*rules: tuple[str, str] | tuple[str, str, str]) -> ConfigDict:
    """Model config carrying CEL rules: (rule, message) or (rule, message, fieldPath)."""
    validations: list[JsonValue] = []
    for r in rules:
        entry: dict[str, JsonValue] = {"rule": r[0], "message": r[1]}
        if len(r) == 3:
            entry["fieldPath"] = r[2]
        validations.append(entry)
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": validations})


def field_rules(*rules: tuple[str, str]) -> JsonDict:
    """``json_schema_extra`` of one field: CEL rules on its value (``self``), as (rule, message).

    The API server reports a broken rule as ``<field path>: Invalid value: ...: <message>``.
    These rules are checked at admission only; pydantic does not evaluate CEL.
    """
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


def pattern_rule(message: str, *more: tuple[str, str]) -> Callable[[JsonDict], None]:
    """``json_schema_extra`` of a ``Field(pattern=...)``: a pattern with a readable message.

    Pydantic still enforces the pattern in Python; in the CRD it becomes the CEL rule
    ``self.matches(pattern)`` carrying ``message``, so the API server answers with that message
    instead of "should match '<regex>'". ``more``: further (rule, message) pairs on the value.
    The pattern must be valid for RE2 (Kubernetes) and Rust's regex (pydantic) alike, and is
    written without backslashes or quotes so that it is a plain CEL string literal.
    """

    def apply(schema: JsonDict) -> None:
        options = schema.get("anyOf")
        nodes = (
            [schema, *(o for o in options if isinstance(o, dict))] if isinstance(options, list) else [schema]
        )
        found = [n.pop("pattern") for n in nodes if "pattern" in n]
        if len(found) != 1 or not isinstance(found[0], str):
            raise ValueError(f"pattern_rule needs exactly one pattern on the field, found {found}")
        pattern = found[0]
        if "'" in pattern or "\\" in pattern:
            raise ValueError(f"write the pattern without quotes or backslashes: {pattern}")
        existing = schema.get("x-kubernetes-validations")
        validations: list[JsonValue] = list(existing) if isinstance(existing, list) else []
        for rule, msg in ((f"self.matches('{pattern}')", message), *more):
            validations.append({"rule": rule, "message": msg})
        schema["x-kubernetes-validations"] = validations

    return apply


# ----------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

#: A duration such as ``90s``, ``2h``, ``1h30m`` or ``35d``.
Duration = Annotated[
    str,
    Field(
        pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$",
        json_schema_extra={"example": "2h"},
    ),
]


def parse_duration(text: str) -> float:
    """Seconds in a duration string (``1h30m`` → 5400.0). Raises ValueError on bad input."""
    if not _DURATION_RE.match(text):
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 2h, 1h30m, 35d")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


# ----------------------------------------------------------------------------- timestamps


def parse_time(value: Any) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339, ``Z`` or an offset) or a datetime; None when empty.

    The one timestamp parser of the project: the API server, the kubelet and our own status
    all write RFC 3339, which ``datetime.fromisoformat`` reads once ``Z`` is spelled ``+00:00``;
    a timestamp without a zone is taken as UTC.
    """
    if value in (None, ""):
        return None
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
