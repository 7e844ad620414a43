"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from fermata_api.meta import GPU_RESOURCE

DEFAULT_SPOT_TOLERATIONS: list[dict[str, Any]] = [
    {
        "key": "karpenter.sh/capacity-type",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    },
    {
        "key": "eks.amazonaws.com/capacityType",
        "operator": "Equal",
        "value": "SPOT",
        "effect": "NoSchedule",
    },
]
DEFAULT_GPU_TOLERATIONS: list[dict[str, Any]] = [
    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
]


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def _env_list(name: str) -> tuple[str, ...]:
    """A comma-separated list (empty entries dropped)."""
    return tuple(x.strip() for x in os.environ.get(name, "").split(",") if x.strip())


@dataclass(frozen=True)
class OperatorSettings:
    """Knobs of the operator process (environment variables ``FERMATA_*``)."""

    #: How often a run is reconciled when nothing happens (seconds).
    resync_seconds: float = 60.0
    #: Minimum seconds between status writes that only move running totals (accrued cost,
    #: remaining budget, projection). With the default, a run in steady state costs the API at
    #: most one request a minute; anything else (phase, conditions, closed spans) is written at once.
    cost_write_seconds: float = 60.0
    #: How long a new run's first status write may wait for its just-created pod to be placed,
    #: so that "created" and "placed" are one write (0: write at once).
    first_status_hold_seconds: float = 3.0
    #: Reconciles that may run at once (threads); the API connection pool holds twice as many.
    workers: int = 32
    #: How long the trainer gets to answer a checkpoint request before its pod is stopped.
    checkpoint_request_timeout_seconds: float = 120.0
    #: Heartbeat interval written into the trainer's config.
    trainer_heartbeat_seconds: float = 30.0
    #: Extra tolerations for spot capacity (JSON list in FERMATA_SPOT_TOLERATIONS).
    spot_tolerations: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_SPOT_TOLERATIONS))
    gpu_tolerations: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_GPU_TOLERATIONS))
    #: ConfigMap holding the price table (namespace/name).
    price_table: str = "fermata-system/fermata-prices"
    #: Look up spot prices from AWS EC2 (boto3) when true.
    aws_pricing: bool = False
    #: UID the trainer runs as (the trainer image's user).
    trainer_uid: int = 1000
    #: Webhook notifications (empty URL: none): URL, format (slack | generic), the categories
    #: posted (decision, budget, idle, failure) and the first retry delay.
    notify_webhook_url: str = ""
    notify_format: str = "slack"
    notify_events: tuple[str, ...] = ("decision", "budget", "idle", "failure")
    notify_backoff_seconds: float = 1.0
    #: Label selector of the nodes the operator watches (empty: every node). Nodes outside it
    #: that a Fermata pod lands on are read on demand (facts still right, but their termination
    #: taint is seen at the next resync instead of at once).
    node_label_selector: str = ""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        base = cls()
        tolerations = os.environ.get("FERMATA_SPOT_TOLERATIONS")
        return cls(
            resync_seconds=_env_float("FERMATA_RESYNC_SECONDS", base.resync_seconds),
            cost_write_seconds=_env_float("FERMATA_COST_WRITE_SECONDS", base.cost_write_seconds),
            first_status_hold_seconds=_env_float(
                "FERMATA_FIRST_STATUS_HOLD_SECONDS", base.first_status_hold_seconds
            ),
            workers=max(1, int(_env_float("FERMATA_WORKERS", base.workers))),
            checkpoint_request_timeout_seconds=_env_float(
                "FERMATA_CHECKPOINT_REQUEST_TIMEOUT_SECONDS",
                base.checkpoint_request_timeout_seconds,
            ),
            trainer_heartbeat_seconds=_env_float(
                "FERMATA_TRAINER_HEARTBEAT_SECONDS", base.trainer_heartbeat_seconds
            ),
            spot_tolerations=json.loads(tolerations) if tolerations else base.spot_tolerations,
            price_table=os.environ.get("FERMATA_PRICE_TABLE", base.price_table),
            aws_pricing=os.environ.get("FERMATA_AWS_PRICING", "").lower() in {"1", "true", "yes"},
            trainer_uid=int(os.environ.get("FERMATA_TRAINER_UID", base.trainer_uid)),
            notify_webhook_url=os.environ.get("FERMATA_NOTIFY_WEBHOOK_URL", "").strip(),
            notify_format=os.environ.get("FERMATA_NOTIFY_FORMAT", "") or base.notify_format,
            notify_events=_env_list("FERMATA_NOTIFY_EVENTS") or base.notify_events,
            notify_backoff_seconds=_env_float("FERMATA_NOTIFY_BACKOFF_SECONDS", base.notify_backoff_seconds),
            node_label_selector=os.environ.get("FERMATA_NODE_LABEL_SELECTOR", "").strip(),
        )
