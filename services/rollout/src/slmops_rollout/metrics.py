"""The rollout service's metric families: rollouts by state, the fleet by running version, and
the gateway reports it receives.

Rollouts and gateway records are held in the engine's memory anyway; a scrape counts them (a
refresh at most every ``REFRESH_EVERY_S``: a fleet of 100,000 is tens of ms to count). A
gateway's running version comes from its last applied report; the version of a variant is
known from the rollouts that shipped it. Labels name model versions and device classes, never
a gateway or a variant.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, get_args

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from slmops.bus.batches import BatchHandler
from slmops.events import CloudEvent, GatewayReport
from slmops.service.metrics import ServiceMetrics
from slmops_rollout.engine import Engine
from slmops_rollout.state import RolloutState

REFRESH_EVERY_S = 5.0
NONE = "none"  # a gateway that runs no model yet
UNKNOWN = "unknown"  # a variant no rollout of this service shipped (installed by hand)
RolloutStatus = RolloutState.model_fields["status"].annotation


class RolloutMetrics(Collector):
    def __init__(self, engines: Callable[[], Awaitable[Engine | None]]) -> None:
        self.engines = engines
        self.rollouts: Tally[str] = Tally()
        self.gateways: Tally[tuple[str, str, str]] = Tally()  # (model, version, class) -> count

    async def refresh(self) -> None:
        engine = await self.engines()
        if engine is None:
            return
        rollouts = await engine.all()
        versions = {desired.variant_id: (desired.model_name, desired.version)
                    for state in rollouts for desired in state.desired.values()}  # fmt: skip
        gateways: Tally[tuple[str, str, str]] = Tally()
        for record in await engine.gateways.all():
            variant = record.running_variant_id
            model, version = versions.get(variant, (UNKNOWN, UNKNOWN)) if variant else (NONE, NONE)
            gateways[(model, version, record.device_class)] += 1
        self.rollouts = Tally(state.status for state in rollouts)
        self.gateways = gateways

    def collect(self) -> Iterator[Metric]:
        rollouts = GaugeMetricFamily("slmops_rollouts", "Rollouts, by state.", labels=["state"])
        for status in get_args(RolloutStatus):
            rollouts.add_metric([status], self.rollouts.get(status, 0))
        yield rollouts
        gateways = GaugeMetricFamily(
            "slmops_gateways",
            "Gateways by the model version they run (their last applied report) and class.",
            labels=["model", "version", "device_class"],
        )
        for (model, version, device_class), count in sorted(self.gateways.items()):
            gateways.add_metric([model, version, device_class], count)
        yield gateways


def register(
    metrics: ServiceMetrics, engines: Callable[[], Awaitable[Engine | None]]
) -> Callable[[BatchHandler], BatchHandler]:
    """The rollout families; returns what wraps the batched report handler so that the
    reports it receives are counted by kind (each delivery, retries included)."""
    collector = RolloutMetrics(engines)
    metrics.registry.register(collector)
    metrics.add_refresher("rollouts", collector.refresh, min_interval_s=REFRESH_EVERY_S)
    reports = Counter(
        "slmops_gateway_reports_received",
        "Gateway reports received (each delivery, retries included), by kind.",
        ["kind"],
        registry=metrics.registry,
    )

    def counting(handler: BatchHandler) -> BatchHandler:
        async def counted(events: list[CloudEvent[Any]]) -> None:
            kinds = Tally(e.data.kind for e in events if isinstance(e.data, GatewayReport))
            for kind, count in kinds.items():
                reports.labels(kind).inc(count)
            await handler(events)

        return counted

    return counting
