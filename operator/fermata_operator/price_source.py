"""Where prices come from before planning: the chart's price table and, optionally, AWS.

:class:`PriceSource` re-reads the ``fermata-prices`` ConfigMap at most every ``refresh_seconds``
(so a price added by an admin reaches runs waiting with ``PriceUnknown`` without a restart)
and, with ``FERMATA_AWS_PRICING=true``, asks AWS (:mod:`fermata_operator.aws_prices`, cached)
for the instance types a run may use. The planner then gets a plain
:class:`~fermata_operator.policies.prices.PriceTable` snapshot: no I/O inside planning.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_api import CapacityType
from fermata_operator.policies.prices import PriceTable, price_key

log = structlog.get_logger("fermata.prices")

LiveLookup = Callable[[str, str], float | None]


class PriceSource:
    def __init__(
        self,
        core: client.CoreV1Api | None,
        config_map: str,
        live: LiveLookup | None = None,
        refresh_seconds: float = 60.0,
    ) -> None:
        self.core = core
        self.config_map = config_map
        self.live = live
        self.refresh_seconds = refresh_seconds
        self._table = PriceTable()
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    def _load(self) -> PriceTable:
        ns, _, name = self.config_map.partition("/")
        if self.core is None or not name:
            return PriceTable()
        try:
            cm = self.core.read_namespaced_config_map(name, ns)
        except ApiException as exc:
            if self._loaded_at is None or exc.status != 404:
                log.warning(
                    "price table not read; using built-in prices",
                    configmap=self.config_map,
                    status=exc.status,
                )
            return PriceTable() if exc.status == 404 else self._table
        return PriceTable.from_config_map_data(cm.data)

    def table(self) -> PriceTable:
        """The chart's table (plus built-ins), re-read when older than ``refresh_seconds``."""
        with self._lock:
            stale = self._loaded_at is None or time.monotonic() - self._loaded_at >= self.refresh_seconds
            if stale:
                self._table, self._loaded_at = self._load(), time.monotonic()
            return self._table

    def snapshot(self, instance_types: Iterable[str]) -> PriceTable:
        """The table, with live prices for ``instance_types`` (both capacity types) on top."""
        table = self.table()
        if self.live is None:
            return table
        live: dict[str, float] = {}
        for itype in set(instance_types):
            for cap in CapacityType:
                price = self.live(itype, cap.value)
                if price is not None:
                    live[price_key(itype, cap.value)] = price
        return table.with_prices(live)
