"""The price table: hourly US dollars per node, keyed ``<instance-type>/<spot|on-demand>``.

Order of precedence: the run's ``spec.budget.prices`` overrides, then the table the operator
resolved before planning (live AWS prices when enabled, else the chart's ``fermata-prices``
ConfigMap, else the built-ins below). Nothing here fetches anything: live prices are looked up
by the controller for the instance types a run can use, before :func:`plan` is called.

**Fail safe.** A price that is not known is never taken as $0: a run whose allowed instance
types are not all priced gets no pod (``Accepted=False``, reason ``PriceUnknown``), and a pod
that lands on a node whose type or capacity cannot be read is billed at the highest price the
run could pay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fermata_api import CapacityType, PriceOverride, ResourcesSpec

#: Built-in hourly prices. On-demand: AWS us-east-1 Linux list prices. Spot: the project plan's
#: $0.39/h for g4dn.xlarge (and $1.30/h on-demand, the plan's figure) and, elsewhere,
#: conservative estimates of about 40% of on-demand. Spot moves by the hour: enable live prices
#: (FERMATA_AWS_PRICING) or keep the chart's table current.
_ON_DEMAND: dict[str, float] = {
    # NVIDIA T4
    "g4dn.xlarge": 1.30,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912,  # 4 GPUs
    "g4dn.16xlarge": 4.352,
    "g4dn.metal": 7.824,  # 8 GPUs
    # NVIDIA A10G
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672,  # 4 GPUs
    "g5.16xlarge": 4.096,
    "g5.24xlarge": 8.144,  # 4 GPUs
    "g5.48xlarge": 16.288,  # 8 GPUs
    # NVIDIA L4
    "g6.xlarge": 0.805,
    "g6.2xlarge": 0.978,
    "g6.4xlarge": 1.323,
    "g6.8xlarge": 2.014,
    "g6.12xlarge": 4.602,  # 4 GPUs
    "g6.24xlarge": 6.675,  # 4 GPUs
    "g6.48xlarge": 13.35,  # 8 GPUs
    # NVIDIA L40S
    "g6e.xlarge": 1.861,
    "g6e.2xlarge": 2.242,
    "g6e.12xlarge": 10.493,  # 4 GPUs
    "g6e.24xlarge": 15.066,  # 4 GPUs
    "g6e.48xlarge": 30.131,  # 8 GPUs
    # NVIDIA V100
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,  # 4 GPUs
    "p3.16xlarge": 24.48,  # 8 GPUs
    # NVIDIA A100 / H100
    "p4d.24xlarge": 32.773,  # 8 GPUs
    "p4de.24xlarge": 40.966,  # 8 GPUs
    "p5.48xlarge": 55.04,  # 8 GPUs
    # CPU only: the preparation pod (spec.preparation.resources.instanceTypes)
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m5.4xlarge": 0.768,
    "m6i.large": 0.096,
    "m6i.xlarge": 0.192,
    "m6i.2xlarge": 0.384,
    "m6i.4xlarge": 0.768,
    "c5.xlarge": 0.17,
    "c5.2xlarge": 0.34,
    "c5.4xlarge": 0.68,
    "c6i.xlarge": 0.17,
    "c6i.2xlarge": 0.34,
    "c6i.4xlarge": 0.68,
    "r5.xlarge": 0.252,
    "r5.2xlarge": 0.504,
}
_SPOT_KNOWN: dict[str, float] = {
    "g4dn.xlarge": 0.39,
    "g4dn.2xlarge": 0.30,
    "g5.xlarge": 0.45,
    "g5.2xlarge": 0.55,
    "g6.xlarge": 0.35,
    "p3.2xlarge": 0.92,
}
SPOT_ESTIMATE_FRACTION = 0.4


def price_key(instance_type: str, capacity_type: str) -> str:
    return f"{instance_type}/{capacity_type}"


def _builtin() -> dict[str, float]:
    table: dict[str, float] = {}
    for itype, od in _ON_DEMAND.items():
        table[price_key(itype, CapacityType.on_demand.value)] = od
        spot = _SPOT_KNOWN.get(itype, round(od * SPOT_ESTIMATE_FRACTION, 4))
        table[price_key(itype, CapacityType.spot.value)] = spot
    return table


DEFAULT_PRICES: dict[str, float] = _builtin()


@dataclass(frozen=True)
class PriceTable:
    """Hourly USD prices keyed ``instance-type/capacity-type`` (a snapshot: no I/O)."""

    prices: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    @classmethod
    def from_config_map_data(cls, data: Mapping[str, str] | None) -> PriceTable:
        """The built-ins plus a ConfigMap's data (``g4dn.xlarge_spot: "0.39"``; ConfigMap keys
        cannot hold ``/``). A value that is not a finite non-negative number is ignored."""
        table = dict(DEFAULT_PRICES)
        for key, value in (data or {}).items():
            itype, sep, capacity = key.rpartition("/" if "/" in key else "_")
            try:
                price = float(value)
            except ValueError:
                continue
            if sep and itype and math.isfinite(price) and price >= 0:
                table[price_key(itype, capacity)] = price
        return cls(prices=table)

    def with_prices(self, extra: Mapping[str, float]) -> PriceTable:
        """This table with ``extra`` (e.g. live prices) taking precedence."""
        return PriceTable(prices={**self.prices, **extra})

    def lookup(
        self,
        instance_type: str | None,
        capacity_type: str | None,
        overrides: Iterable[PriceOverride] = (),
    ) -> float | None:
        if not instance_type or not capacity_type:
            return None
        for o in overrides:
            if o.instance_type == instance_type and o.capacity_type.value == capacity_type:
                return o.hourly_usd
        return self.prices.get(price_key(instance_type, capacity_type))


def unpriced_types(
    resources: ResourcesSpec,
    capacities: Iterable[CapacityType],
    table: PriceTable,
    overrides: Iterable[PriceOverride],
) -> list[str]:
    """The ``type/capacity`` pairs a new pod could land on that have no price."""
    return unpriced(resources.instance_types, capacities, table, overrides)


def unpriced(
    instance_types: Iterable[str],
    capacities: Iterable[CapacityType],
    table: PriceTable,
    overrides: Iterable[PriceOverride],
) -> list[str]:
    """The ``type/capacity`` pairs of these instance types that have no price."""
    overrides, types = list(overrides), list(instance_types)
    return [
        price_key(itype, cap.value)
        for cap in capacities
        for itype in types
        if table.lookup(itype, cap.value, overrides) is None
    ]


def worst_case(
    resources: ResourcesSpec, table: PriceTable, overrides: Iterable[PriceOverride]
) -> float | None:
    """The highest price any allowed instance type could cost (for a node that cannot be read)."""
    overrides = list(overrides)
    found = [
        p
        for cap in CapacityType
        for itype in resources.instance_types
        if (p := table.lookup(itype, cap.value, overrides)) is not None
    ]
    return max(found) if found else None


def unknown_price_message(missing: list[str]) -> str:
    return (
        "no price for " + ", ".join(missing) + ": add it to spec.budget.prices "
        "(instanceType, capacityType, hourlyUSD) or to the chart's price table "
        "(values.prices, ConfigMap fermata-prices, key <instance-type>_<spot|on-demand>); "
        "no pod is started while the cost cannot be counted"
    )
