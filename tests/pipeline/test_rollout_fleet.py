"""The rollout service's view of the fleet, built from gateway reports on real NATS: records
per gateway (class, labels, what runs, health), label selectors, and a malformed report
dead-lettered with the service still up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from slmops.bus import Bus
from slmops.events import GatewayReport, new_event
from slmops.events.payloads import HealthAggregate
from slmops.settings import PlatformSettings
from slmops.testing.events import stream_count
from slmops_rollout.app import create_app
from slmops_rollout.settings import RolloutSettings

pytestmark = [pytest.mark.integration]


@pytest.fixture
async def rollout(
    platform_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    bus: Bus,
    everything_auth: httpx.Auth,
) -> AsyncIterator[httpx.AsyncClient]:
    for key, value in platform_env.items():
        monkeypatch.setenv(key, value)
    app = create_app(RolloutSettings(platform=PlatformSettings()))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://r", auth=everything_auth
        ) as api,
    ):
        await app.state.runtime.wait_started(timeout_s=20)
        yield api


def _report(gateway_id: str, kind: str, **fields: Any) -> GatewayReport:
    site = "berlin" if gateway_id.endswith(("1", "2")) else "paris"
    return GatewayReport(gateway_id=gateway_id, kind=kind, device_class="test-cpu",  # type: ignore[arg-type]
                         labels={"site": site}, **fields)  # fmt: skip


async def _until(api: httpx.AsyncClient, path: str, ready: Any) -> Any:
    for _ in range(100):
        body = (await api.get(path)).json()
        if ready(body):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never became ready: {body}")


async def test_reports_build_the_fleet_and_a_malformed_one_is_dead_lettered(
    rollout: httpx.AsyncClient, bus: Bus
) -> None:
    # setup / execute: three gateways register; one applies a variant and reports health
    for gw in ("gw-1", "gw-2", "gw-3"):
        await bus.publish(new_event(_report(gw, "registered", capabilities={"ram_mb": 512}),
                                    source="/test"))  # fmt: skip
    await bus.publish(new_event(_report("gw-1", "applied", variant_id="v-a", generation=2),
                                source="/test"))  # fmt: skip
    health = HealthAggregate(window_s=30, request_count=12, error_rate=0.0, latency_p95_ms=4.0)
    await bus.publish(new_event(_report("gw-1", "health", health=health), source="/test"))
    await bus.js.publish("slmops.gateway.report.v1.gw-9", b'{"not": "a cloudevent"')

    # assert
    fleet = await _until(rollout, "/v1/gateways", lambda b: len(b) == 3 and b[0]["health"])
    first = fleet[0]
    assert (first["gateway_id"], first["running_variant_id"], first["generation"]) == (
        "gw-1", "v-a", 2)  # fmt: skip
    assert first["health"]["request_count"] == 12
    assert first["capabilities"] == {"ram_mb": 512}
    berlin = (await rollout.get("/v1/gateways", params={"selector": "site=berlin"})).json()
    assert [g["gateway_id"] for g in berlin] == ["gw-1", "gw-2"]
    for _ in range(100):
        if await stream_count(bus, "SLMOPS_DLQ") == 1:
            break
        await asyncio.sleep(0.1)
    assert await stream_count(bus, "SLMOPS_DLQ") == 1
    assert (await rollout.get("/readyz")).status_code == 200
