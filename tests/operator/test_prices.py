"""Price lookup order, the ConfigMap format, and the live-price cache (with a fake clock)."""

from __future__ import annotations

from fermata_api import CapacityType, PriceOverride
from fermata_operator.aws_prices import CachedPrices
from fermata_operator.policies.prices import PriceTable
from fermata_operator.price_source import PriceSource


def test_lookup_order_override_then_live_then_table() -> None:
    table = PriceTable.from_config_map_data({"g4dn.xlarge_spot": "0.21", "bad": "x"})
    assert table.lookup("g4dn.xlarge", "spot") == 0.21
    assert table.lookup("g4dn.xlarge", "on-demand") == 1.30  # built-in default
    assert table.lookup("x1.tiny", "spot") is None
    override = [PriceOverride(instance_type="g4dn.xlarge", capacity_type=CapacityType.spot, hourly_usd=0.5)]
    assert table.lookup("g4dn.xlarge", "spot", override) == 0.5
    source = PriceSource(None, "", live=lambda it, cap: 0.33 if cap == "spot" else None)
    snap = source.snapshot(["g4dn.xlarge"])
    assert snap.lookup("g4dn.xlarge", "spot") == 0.33
    assert snap.lookup("g4dn.xlarge", "on-demand") == 1.30  # live has no answer: table
    assert snap.lookup("g4dn.xlarge", "spot", override) == 0.5  # the run's override still wins


def test_live_prices_are_cached_and_failures_fall_back() -> None:
    calls: list[tuple[str, str]] = []
    now = [0.0]

    def fetch(it: str, cap: str) -> float | None:
        calls.append((it, cap))
        if it == "broken":
            raise RuntimeError("AWS said no")
        return 0.4

    cache = CachedPrices(fetch, ttl_seconds=3600, failure_ttl_seconds=300, clock=lambda: now[0])
    assert cache("g5.xlarge", "spot") == 0.4
    assert cache("g5.xlarge", "spot") == 0.4
    assert calls == [("g5.xlarge", "spot")]
    assert cache("broken", "spot") is None
    now[0] = 200
    assert cache("broken", "spot") is None and len(calls) == 2  # failure cached
    now[0] = 400
    cache("broken", "spot")
    assert len(calls) == 3  # retried after the failure TTL
    now[0] = 3700
    cache("g5.xlarge", "spot")
    assert len(calls) == 4  # refreshed after the TTL

    def down(it: str, cap: str) -> float | None:
        raise ConnectionError("no route to AWS")

    snap = PriceSource(None, "", live=CachedPrices(down)).snapshot(["g5.xlarge"])
    assert snap.lookup("g5.xlarge", "spot") == 0.45  # AWS unreachable: the table's price
