"""The latest health per gateway, indexed by model: a gate reads only the gateways on the
rolled-out variants, and a gateway that changed model counts only for its new one."""

from __future__ import annotations

from slmops.events.payloads import HealthAggregate
from slmops_rollout.health import LatestHealth


def _health(requests: int) -> HealthAggregate:
    return HealthAggregate(window_s=30, request_count=requests, error_rate=0.0,
                           latency_p50_ms=5.0, latency_p95_ms=9.0)  # fmt: skip


def test_a_gate_reads_the_latest_health_of_gateways_on_its_variants_only() -> None:
    health = LatestHealth()
    health.put("gw-1", "v-old", _health(1))
    health.put("gw-2", "v-old", _health(2))
    health.put("gw-3", None, _health(3))  # runs nothing yet

    # a gateway moves to the new model, then reports again on it
    health.put("gw-1", "v-new", _health(10))
    health.put("gw-1", "v-new", _health(11))

    assert dict(health.on(["v-new"])) == {"gw-1": _health(11)}
    assert dict(health.on(["v-old"])) == {"gw-2": _health(2)}  # gw-1 left it
    assert dict(health.on(["v-new", "v-old", "v-new"])).keys() == {"gw-1", "gw-2"}
    assert dict(health.on(["v-none"])) == {}
    assert len(health) == 3

    # the last gateway leaves a variant: nothing is left of it
    health.put("gw-2", "v-new", _health(20))
    assert dict(health.on(["v-old"])) == {}
    assert dict(health.on(["v-new"])) == {"gw-1": _health(11), "gw-2": _health(20)}
