"""The price table: built-ins, the chart's ConfigMap format, precedence and the fail-safe helpers."""

from __future__ import annotations

import pytest

from fermata_api import CapacityType, PriceOverride, ResourcesSpec
from fermata_operator.policies import prices
from fermata_operator.policies.prices import DEFAULT_PRICES, PriceTable

MULTI_GPU = ["g4dn.12xlarge", "g5.12xlarge", "g5.48xlarge", "p4d.24xlarge", "p5.48xlarge"]


def resources(*types: str) -> ResourcesSpec:
    return ResourcesSpec(image="ghcr.io/fermata/trainer:0.1.0", instance_types=list(types))


def override(itype: str, cap: CapacityType, usd: float) -> PriceOverride:
    return PriceOverride(instance_type=itype, capacity_type=cap, hourly_usd=usd)


@pytest.mark.parametrize("itype", MULTI_GPU)
@pytest.mark.parametrize("cap", ["spot", "on-demand"])
def test_builtin_multi_gpu_types_are_priced(itype: str, cap: str) -> None:
    price = PriceTable().lookup(itype, cap)
    assert price is not None and price > 0
    assert DEFAULT_PRICES[f"{itype}/{cap}"] == price


def test_builtin_values() -> None:
    t = PriceTable()
    assert t.lookup("g4dn.xlarge", "spot") == 0.39
    assert t.lookup("g4dn.xlarge", "on-demand") == 1.30
    assert t.lookup("p5.48xlarge", "on-demand") == 55.04
    # Spot without a known figure: 40% of on-demand, rounded to 4 places.
    assert t.lookup("g5.48xlarge", "spot") == round(16.288 * prices.SPOT_ESTIMATE_FRACTION, 4) == 6.5152
    assert t.lookup("p4d.24xlarge", "spot") == 13.1092


def test_lookup_without_type_or_capacity_is_unknown() -> None:
    t = PriceTable()
    assert t.lookup(None, "spot") is None
    assert t.lookup("g4dn.xlarge", None) is None
    assert t.lookup("", "spot") is None
    assert t.lookup("x9.huge", "spot") is None


def test_config_map_both_key_forms() -> None:
    t = PriceTable.from_config_map_data(
        {"g5.xlarge_spot": "0.21", "g5.xlarge/on-demand": "0.99", "p4d.24xlarge_on-demand": "30"}
    )
    assert t.lookup("g5.xlarge", "spot") == 0.21
    assert t.lookup("g5.xlarge", "on-demand") == 0.99
    assert t.lookup("p4d.24xlarge", "on-demand") == 30.0
    assert t.lookup("g4dn.xlarge", "spot") == 0.39  # untouched built-in


def test_config_map_adds_new_types() -> None:
    t = PriceTable.from_config_map_data({"trn1.2xlarge_spot": "0.5"})
    assert t.lookup("trn1.2xlarge", "spot") == 0.5
    assert t.lookup("trn1.2xlarge", "on-demand") is None


@pytest.mark.parametrize(
    "data",
    [
        {"g5.xlarge_spot": "cheap"},
        {"g5.xlarge_spot": ""},
        {"g5.xlarge_spot": "-0.1"},
        {"g5.xlarge_spot": "nan"},
        {"nosep": "0.1"},
        {"_spot": "0.1"},
    ],
)
def test_config_map_bad_values_ignored(data: dict[str, str]) -> None:
    t = PriceTable.from_config_map_data(data)
    assert t.lookup("g5.xlarge", "spot") == 0.45
    assert dict(t.prices) == DEFAULT_PRICES


def test_config_map_zero_is_a_price() -> None:
    assert PriceTable.from_config_map_data({"g5.xlarge_spot": "0"}).lookup("g5.xlarge", "spot") == 0.0


def test_config_map_infinite_price_ignored() -> None:
    for value in ("inf", "1e400"):
        t = PriceTable.from_config_map_data({"g5.xlarge_spot": value})
        assert t.lookup("g5.xlarge", "spot") == 0.45


def test_none_config_map_is_the_builtins() -> None:
    assert dict(PriceTable.from_config_map_data(None).prices) == DEFAULT_PRICES


def test_precedence_override_then_extra_then_config_map() -> None:
    t = PriceTable.from_config_map_data({"g5.xlarge_spot": "0.30"})
    live = t.with_prices({"g5.xlarge/spot": 0.33})
    assert t.lookup("g5.xlarge", "spot") == 0.30  # the original is unchanged
    assert live.lookup("g5.xlarge", "spot") == 0.33
    assert live.lookup("g5.xlarge", "on-demand") == 1.006
    ov = [override("g5.xlarge", CapacityType.spot, 0.11)]
    assert live.lookup("g5.xlarge", "spot", ov) == 0.11
    # An override for the other capacity does not apply.
    assert live.lookup("g5.xlarge", "on-demand", ov) == 1.006
    # An override may price a type nothing else knows, and 0 is a real price.
    assert live.lookup("x9.huge", "spot", [override("x9.huge", CapacityType.spot, 0.0)]) == 0.0


def test_unpriced_types_lists_exactly_the_missing_pairs() -> None:
    res = resources("g5.xlarge", "x9.huge", "y1.big")
    ov = [override("y1.big", CapacityType.spot, 2.0)]
    both = [CapacityType.spot, CapacityType.on_demand]
    assert prices.unpriced_types(res, both, PriceTable(), ov) == [
        "x9.huge/spot",
        "x9.huge/on-demand",
        "y1.big/on-demand",
    ]
    assert prices.unpriced_types(res, [CapacityType.spot], PriceTable(), ov) == ["x9.huge/spot"]
    assert prices.unpriced_types(resources("g5.xlarge"), both, PriceTable(), []) == []


def test_worst_case_is_the_maximum_over_types_and_capacities() -> None:
    t = PriceTable()
    assert prices.worst_case(resources("g4dn.xlarge", "g5.xlarge"), t, []) == 1.30
    assert prices.worst_case(resources("g4dn.xlarge", "p5.48xlarge"), t, []) == 55.04
    ov = [override("g4dn.xlarge", CapacityType.spot, 99.0)]
    assert prices.worst_case(resources("g4dn.xlarge", "g5.xlarge"), t, ov) == 99.0
    assert prices.worst_case(resources("x9.huge", "g5.xlarge"), t, []) == 1.006
    assert prices.worst_case(resources("x9.huge"), t, []) is None


def test_unknown_price_message_names_type_and_both_remedies() -> None:
    msg = prices.unknown_price_message(["x9.huge/spot", "x9.huge/on-demand"])
    assert msg.startswith("no price for x9.huge/spot, x9.huge/on-demand:")
    assert "spec.budget.prices" in msg
    assert "(instanceType, capacityType, hourlyUSD)" in msg
    assert "ConfigMap fermata-prices" in msg
    assert "<instance-type>_<spot|on-demand>" in msg
    assert "no pod is started" in msg
