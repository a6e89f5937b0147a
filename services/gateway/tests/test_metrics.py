"""A gateway's serving families: running totals that no health report resets."""

from __future__ import annotations

from slmops.service.metrics import ServiceMetrics
from slmops_gateway.health import HealthWindow
from slmops_gateway.metrics import register


def test_inferences_and_tokens_add_up_across_health_reports() -> None:
    health = HealthWindow()
    metrics = ServiceMetrics("gateway")
    register(metrics, health)
    value = metrics.registry.get_sample_value

    health.record(12.0, ok=True)
    health.record_generation(ttft_ms=5.0, decode_tokens=9, decode_s=0.1)  # 1 + 9 tokens
    health.record(40.0, ok=False)
    health.record_generation(ttft_ms=None, decode_tokens=0, decode_s=0.0)  # no token out
    report = health.take()  # a health report starts a new window, not new totals
    health.record(8.0, ok=True)
    health.record_generation(ttft_ms=3.0, decode_tokens=4, decode_s=0.05)

    assert report.request_count == 2
    assert value("slmops_gateway_inferences_total", {"outcome": "ok"}) == 2
    assert value("slmops_gateway_inferences_total", {"outcome": "failed"}) == 1
    assert value("slmops_gateway_generated_tokens_total") == 15
