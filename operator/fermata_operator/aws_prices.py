"""Live GPU prices from AWS (enabled with ``FERMATA_AWS_PRICING=true``), cached, table as fallback.

* Spot: the newest ``DescribeSpotPriceHistory`` entry for the instance type (Linux/UNIX) in the
  operator's region — the highest across availability zones, so the estimate never undercounts.
* On-demand: the AWS Price List API (``pricing:GetProducts``, served from ``us-east-1``), Linux,
  shared tenancy, no pre-installed software.

Answers are cached for ``ttl_seconds`` (default 1 h); a failed lookup is cached too (for a
shorter time) and returns None, so :class:`fermata_operator.cost.PriceTable` falls back to the
chart's price table. The operator's IAM role needs ``ec2:DescribeSpotPriceHistory`` and
``pricing:GetProducts``; nothing here runs in tests, which have no AWS to talk to — the caching
and fallback logic is tested with an injected fetcher.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

log = structlog.get_logger("fermata.aws_prices")

Fetcher = Callable[[str, str], float | None]

#: Price List API "location" names of the regions with GPU capacity most used for training.
REGION_NAMES = {
    "us-east-1": "US East (N. Virginia)",
    "us-east-2": "US East (Ohio)",
    "us-west-2": "US West (Oregon)",
    "eu-west-1": "EU (Ireland)",
    "eu-central-1": "EU (Frankfurt)",
    "ap-northeast-1": "Asia Pacific (Tokyo)",
    "ap-southeast-1": "Asia Pacific (Singapore)",
}


@dataclass
class CachedPrices:
    """A thread-safe TTL cache in front of a price fetcher."""

    fetch: Fetcher
    ttl_seconds: float = 3600.0
    failure_ttl_seconds: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[tuple[str, str], tuple[float, float | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, instance_type: str, capacity_type: str) -> float | None:
        key = (instance_type, capacity_type)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        try:
            price = self.fetch(instance_type, capacity_type)
        except Exception as exc:  # any AWS trouble: fall back to the table for a while
            log.warning(
                "aws price lookup failed", instance_type=instance_type, capacity=capacity_type, error=str(exc)
            )
            price = None
        ttl = self.ttl_seconds if price is not None else self.failure_ttl_seconds
        with self._lock:
            self._cache[key] = (now + ttl, price)
        return price


def boto3_fetcher(region: str, session: Any | None = None) -> Fetcher:
    """A fetcher that asks EC2 (spot) and the Price List API (on-demand)."""
    import boto3

    sess = session or boto3.session.Session(region_name=region)
    ec2 = sess.client("ec2", region_name=region)
    pricing = sess.client("pricing", region_name="us-east-1")

    def spot(instance_type: str) -> float | None:
        resp = ec2.describe_spot_price_history(
            InstanceTypes=[instance_type],
            ProductDescriptions=["Linux/UNIX"],
            StartTime=datetime.now(UTC) - timedelta(hours=3),
            MaxResults=100,
        )
        newest: dict[str, tuple[datetime, float]] = {}
        for item in resp.get("SpotPriceHistory", []):
            zone, ts, price = item["AvailabilityZone"], item["Timestamp"], float(item["SpotPrice"])
            if zone not in newest or ts > newest[zone][0]:
                newest[zone] = (ts, price)
        return max((p for _, p in newest.values()), default=None)

    def on_demand(instance_type: str) -> float | None:
        location = REGION_NAMES.get(region)
        if location is None:
            return None
        filters = [
            {"Type": "TERM_MATCH", "Field": "instanceType", "Value": instance_type},
            {"Type": "TERM_MATCH", "Field": "location", "Value": location},
            {"Type": "TERM_MATCH", "Field": "operatingSystem", "Value": "Linux"},
            {"Type": "TERM_MATCH", "Field": "tenancy", "Value": "Shared"},
            {"Type": "TERM_MATCH", "Field": "preInstalledSw", "Value": "NA"},
            {"Type": "TERM_MATCH", "Field": "capacitystatus", "Value": "Used"},
        ]
        resp = pricing.get_products(ServiceCode="AmazonEC2", Filters=filters, MaxResults=10)
        for raw in resp.get("PriceList", []):
            product = json.loads(raw) if isinstance(raw, str) else raw
            for term in product.get("terms", {}).get("OnDemand", {}).values():
                for dim in term.get("priceDimensions", {}).values():
                    usd = dim.get("pricePerUnit", {}).get("USD")
                    if usd and float(usd) > 0:
                        return float(usd)
        return None

    def fetch(instance_type: str, capacity_type: str) -> float | None:
        return spot(instance_type) if capacity_type == "spot" else on_demand(instance_type)

    return fetch
