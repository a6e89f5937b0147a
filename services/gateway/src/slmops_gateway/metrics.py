"""The gateway's serving families: inference requests by outcome and tokens generated.

Read from the running totals the health window keeps beside its per-report aggregates (the
HTTP requests by route and status come from the SDK, like on every service).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from slmops.service.metrics import ServiceMetrics
from slmops_gateway.health import HealthWindow


class ServingMetrics(Collector):
    def __init__(self, health: HealthWindow) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        health = self.health
        inferences = CounterMetricFamily(
            "slmops_gateway_inferences", "Inference requests served, by outcome (ok, failed).",
            labels=["outcome"],
        )  # fmt: skip
        inferences.add_metric(["ok"], health.total_ok)
        inferences.add_metric(["failed"], health.total_failed)
        yield inferences
        yield CounterMetricFamily(
            "slmops_gateway_generated_tokens", "Tokens generated (streamed or not).",
            value=health.total_tokens,
        )  # fmt: skip


def register(metrics: ServiceMetrics, health: HealthWindow) -> ServingMetrics:
    serving = ServingMetrics(health)
    metrics.registry.register(serving)
    return serving
