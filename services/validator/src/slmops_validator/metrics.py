"""The validator's metric family: variants judged, by verdict and device class.

Read from the validator's records in KV (``validator.variant.<id>``: one per variant, however
often its event was redelivered), so every instance exports the same figures (a dashboard takes
``max`` over instances). A KV get per record: at most every ``REFRESH_EVERY_S``, bounded by the
scrape's timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import nats.js.errors
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from slmops.service.metrics import ServiceMetrics
from slmops_validator.context import ValidatorContext

REFRESH_EVERY_S = 10.0
PREFIX = "validator.variant."
_BURST = 200  # KV gets in flight at once


class ValidationMetrics(Collector):
    def __init__(self, context: ValidatorContext) -> None:
        self.context = context
        self.verdicts: Counter[tuple[str, str]] = Counter()  # (verdict, device class) -> count

    async def refresh(self) -> None:
        kv = await self.context.state()
        if kv is None:
            return
        try:
            keys = [k for k in await kv.keys() if k.startswith(PREFIX)]
        except nats.js.errors.NoKeysError:
            keys = []
        verdicts: Counter[tuple[str, str]] = Counter()
        for start in range(0, len(keys), _BURST):
            entries = await asyncio.gather(*(kv.get(k) for k in keys[start : start + _BURST]),
                                           return_exceptions=True)  # fmt: skip
            for entry in entries:
                if isinstance(entry, BaseException) or not entry.value:
                    continue  # deleted meanwhile
                stored = json.loads(entry.value)
                device_class = str(stored.get("outcome", {}).get("device_class", "unknown"))
                verdicts[(str(stored.get("verdict", "unknown")), device_class)] += 1
        self.verdicts = verdicts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "slmops_validations", "Variants the validator judged, by verdict and device class.",
            labels=["verdict", "device_class"],
        )  # fmt: skip
        for (verdict, device_class), count in sorted(self.verdicts.items()):
            family.add_metric([verdict, device_class], count)
        yield family


def register(metrics: ServiceMetrics, context: ValidatorContext) -> ValidationMetrics:
    validations = ValidationMetrics(context)
    metrics.registry.register(validations)
    metrics.add_refresher("validations", validations.refresh, min_interval_s=REFRESH_EVERY_S)
    return validations
