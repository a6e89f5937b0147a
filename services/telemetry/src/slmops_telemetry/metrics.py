"""The telemetry service's metric families: how fast the fleet's reports are folded, what the
view holds, and the findings published.

The generic families (events by type and outcome, the batch handler's duration, consumer lag)
come from :class:`~slmops.service.metrics.ServiceMetrics`; the batch consumer reports to it as
every consumer does. Labels are finding kinds and device classes, never a gateway or a variant.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from slmops.service.metrics import ServiceMetrics

# A batch is one report up to a full fetch (thousands when a backlog drains).
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)
# Folding a batch: tens of µs for one report, tens of ms for a full fetch.
FOLD_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0)  # fmt: skip


class TelemetryMetrics:
    """What the fold, the window task and the detector count."""

    def __init__(self, metrics: ServiceMetrics, view_keys: Callable[[], int]) -> None:
        registry = metrics.registry
        self.reports_folded = Counter(
            "slmops_telemetry_reports_folded",
            "Gateway health reports folded into the fleet view (each delivery, redeliveries "
            "included: a redelivered report is counted, not folded twice).",
            registry=registry,
        )
        self.batch_size = Histogram(
            "slmops_telemetry_fold_batch_size",
            "Reports per folded batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.fold_seconds = Histogram(
            "slmops_telemetry_fold_seconds",
            "Time to fold one batch of reports into the view, in seconds.",
            buckets=FOLD_BUCKETS_S,
            registry=registry,
        )
        self.findings = Counter(
            "slmops_telemetry_findings",
            "Findings published, by kind (regression, drift) and device class.",
            ["kind", "device_class"],
            registry=registry,
        )
        self.measured = Counter(
            "slmops_telemetry_measured",
            "Device-measured figures published (fleet.measured), by device class.",
            ["device_class"],
            registry=registry,
        )
        self.refused = Counter(
            "slmops_telemetry_reports_refused",
            "Health reports acked without being folded, by reason (future: stamped more than "
            "two windows ahead of this service's clock).",
            ["reason"],
            registry=registry,
        )
        self.detections_run = Counter(
            "slmops_telemetry_detections_run",
            "Times the view was judged for regressions and drift (once per window).",
            registry=registry,
        )
        self.view_keys = Gauge(
            "slmops_telemetry_view_keys",
            "Series of the fleet view: one per (model, version, variant, class, label set).",
            registry=registry,
        )
        self.view_keys.set_function(lambda: float(view_keys()))

    def folded(self, reports: int, seconds: float) -> None:
        self.reports_folded.inc(reports)
        self.batch_size.observe(reports)
        self.fold_seconds.observe(seconds)
