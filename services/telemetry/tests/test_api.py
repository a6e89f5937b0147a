"""The telemetry service in-process on a real nats-server: health reports published on the bus
come back from its API merged per variant and class, judged against the class's budget; a
regression is published once and listed; every route wants a token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from slmops.auth import BearerToken, LocalCredentials
from slmops.bus import Bus
from slmops.events import GatewayReport, new_event
from slmops.events.envelope import CloudEvent
from slmops.events.errors import TransientError
from slmops.events.payloads import HealthAggregate
from slmops.settings import PlatformSettings
from slmops.telemetry import Sketch
from slmops.testing.events import await_events
from slmops.testing.polling import until_answered
from slmops_telemetry.app import create_app
from slmops_telemetry.settings import TelemetrySettings

pytestmark = [pytest.mark.integration]

PROFILE = Path(__file__).parents[3] / "tests" / "pipeline" / "profiles" / "test-cpu.yaml"
BUDGET_MS = 50.0
T0 = (datetime.now(UTC).timestamp() // 1) - 30  # windows of 1 s, in the recent past


class NoReports:
    """A registry that has no validation report of any variant: the budgets alone judge."""

    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        return None


@pytest.fixture
def app(platform_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FastAPI:
    """The service with 1 s windows, a class whose p95 budget is 50 ms, no registry reports."""
    for key, value in platform_env.items():
        monkeypatch.setenv(key, value)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    base = yaml.safe_load(PROFILE.read_text())
    budgets = {**base["budgets"], "max_latency_p95_ms": BUDGET_MS}
    (profiles / "test-cpu.yaml").write_text(yaml.safe_dump({**base, "budgets": budgets}))
    settings = TelemetrySettings(platform=PlatformSettings(), window_s=1.0, keep_windows=600,
                                 profiles_dir=profiles, measured_interval_s=3.0)  # fmt: skip
    app = create_app(settings)
    app.state.field.registry = NoReports()
    return app


@pytest.fixture
async def api(
    app: FastAPI, bus: Bus, everything_auth: httpx.Auth
) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                          auth=everything_auth) as client,
    ):  # fmt: skip
        await app.state.runtime.wait_started(timeout_s=20)
        yield client


def report(gateway: str, variant: str, window: int, latency_ms: float) -> CloudEvent[Any]:
    """One gateway's health report, stamped in window ``window`` (T0 + window seconds)."""
    latencies = [latency_ms * (1 + i / 100) for i in range(30)]
    health = HealthAggregate(
        window_s=1.0, request_count=30, error_rate=0.0,
        latency_ms=Sketch.from_values(latencies).to_wire(), decode_tokens=300, decode_s=3.0,
        peak_memory_mb=200.0 + window,
    )  # fmt: skip
    event = new_event(GatewayReport(gateway_id=gateway, kind="health", device_class="test-cpu",
                                    labels={"site": gateway[-1]}, variant_id=variant,
                                    health=health, model_name="tiny", version="1.0.0"),
                      source=f"/slmops/gateway/{gateway}")  # fmt: skip
    return event.model_copy(update={"time": datetime.fromtimestamp(T0 + window + 0.5, UTC)})


async def publish_windows(bus: Bus, variant: str, latency_ms: float, windows: int) -> list[Any]:
    """Two gateways report in each window, then one more report closes the last of them."""
    sent = []
    for window in range(windows + 1):
        for gateway in ("gw-a", "gw-b"):
            event = report(gateway, variant, window, latency_ms)
            await bus.publish(event)
            if window < windows:
                sent.append(event.data.health)
    return sent


async def _answered(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    found: list[Any] = []

    async def ready() -> bool:
        answer = await client.get(path, params=params)
        found[:] = [answer]
        return answer.status_code == 200 and bool(answer.json())

    await until_answered(ready, f"GET {path} answering rows", timeout_s=20)
    return found[0].json()


async def test_rows_merge_the_gateways_reports_per_variant_and_class(
    api: httpx.AsyncClient, bus: Bus
) -> None:
    # setup / execute: 2 gateways x 3 complete windows
    sent = await publish_windows(bus, "v-fast", 10.0, windows=3)

    # assert: one row of the 3 complete windows (the closing one is still open)
    [row] = await _answered(api, "/v1/fleet/health", model="tiny")
    expected = Sketch.of(*(h.latency_ms for h in sent))
    figures = row["figures"]
    assert (row["variant_id"], row["device_class"], row["windows"]) == ("v-fast", "test-cpu", 3)
    assert (figures["gateways"], figures["requests"]) == (2, 180)
    assert figures["latency_p50_ms"] == pytest.approx(expected.quantile(0.5))
    assert figures["latency_p95_ms"] == pytest.approx(expected.quantile(0.95))
    assert figures["decode_tokens_per_s"] == pytest.approx(100.0)
    assert figures["peak_memory_mb"] == 202.0
    assert sorted(s["labels"]["site"] for s in row["by_labels"]) == ["a", "b"]
    assert [s["figures"]["requests"] for s in row["by_labels"]] == [90, 90]
    assert (await api.get("/v1/fleet/health", params={"model": "other"})).json() == []


async def test_a_version_is_judged_against_its_classes_budget_and_the_regression_listed(
    api: httpx.AsyncClient, bus: Bus
) -> None:
    # setup / execute: a variant 4x slower than the class's p95 budget, for 3 windows
    await publish_windows(bus, "v-slow", 4 * BUDGET_MS, windows=3)

    # assert: its gate fails, with the figure and the budget
    [row] = await _answered(api, "/v1/fleet/health/tiny/1.0.0")
    gates = {g["name"]: g for g in row["gates"]}
    latency = gates["field.latency_p95_ms"]
    assert (latency["passed"], latency["budget"]) == (False, BUDGET_MS)
    assert latency["value"] == pytest.approx(row["figures"]["latency_p95_ms"])
    assert gates["field.error_rate"]["passed"] is True
    assert row["expectations_error"] == ""
    assert row["drift"] is None  # no validation report: no baseline

    # assert: one regression published and listed
    [found] = await await_events(bus, "slmops.fleet.regression.detected.v1.>", count=1,
                                 timeout_s=20)  # fmt: skip
    assert (found.data.variant_id, found.data.metric) == ("v-slow", "latency_p95_ms")
    listed = await _answered(api, "/v1/fleet/findings", model="tiny")
    assert [f["detection_id"] for f in listed] == [found.data.detection_id]
    assert listed[0]["type"] == "slmops.fleet.regression.detected.v1"
    missing = await api.get("/v1/fleet/health/tiny/9.9.9")
    assert missing.status_code == 404


async def test_device_measured_figures_are_published_for_the_complete_windows(
    api: httpx.AsyncClient, bus: Bus
) -> None:
    # execute: 3 complete windows (the measured span is 3 s)
    await publish_windows(bus, "v-slow", 4 * BUDGET_MS, windows=3)

    # assert: one fleet.measured of exactly those windows, judged against the budget
    [measured] = await await_events(bus, "slmops.fleet.measured.v1.>", count=1, timeout_s=20)
    data = measured.data
    assert (data.variant_id, data.device_class, data.model_name) == ("v-slow", "test-cpu", "tiny")
    assert (data.since.timestamp(), data.until.timestamp()) == (T0, T0 + 3)
    assert (data.figures.gateways, data.figures.requests) == (2, 180)
    gates = {g.name: g for g in data.gates}
    assert gates["field.latency_p95_ms"].passed is False
    assert gates["field.latency_p95_ms"].budget == BUDGET_MS


async def test_every_route_wants_a_reader(
    api: httpx.AsyncClient, credentials: LocalCredentials
) -> None:
    scraper = BearerToken(credentials.token("metrics"))
    for path in ("/v1/fleet/health", "/v1/fleet/health/tiny/1.0.0", "/v1/fleet/findings"):
        anonymous = await api.get(path, auth=None)
        assert anonymous.status_code == 401, path
        assert (await api.get(path, auth=scraper)).status_code == 403, path
    assert (await api.get("/metrics", auth=scraper)).status_code == 200


class RegistryAway:
    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        raise TransientError("registry unreachable (ConnectError); will retry")


async def test_without_the_registry_figures_show_and_the_service_stays_ready(
    app: FastAPI, api: httpx.AsyncClient, bus: Bus
) -> None:
    # setup: the registry goes away
    app.state.field.registry = RegistryAway()

    # execute: a window of reports, and one stamped an hour ahead (a gateway's clock)
    await publish_windows(bus, "v-fast", 10.0, windows=1)
    ahead = report("gw-c", "v-fast", 3600, 10.0)
    await bus.publish(ahead)

    # assert: the figures, why the budgets are missing, still ready; the future one not folded
    [row] = await _answered(api, "/v1/fleet/health/tiny/1.0.0")
    assert row["figures"]["requests"] == 60
    assert [g["name"] for g in row["gates"]] == ["field.error_rate"]  # the platform's own
    assert "registry unreachable" in row["expectations_error"]
    ready = (await api.get("/readyz")).json()
    assert ready["ready"] is True, ready

    async def refused() -> bool:
        text = (await api.get("/metrics")).text
        return 'slmops_telemetry_reports_refused_total{reason="future"} 1.0' in text

    await until_answered(refused, "the report from the future refused", timeout_s=10)
    [row] = (await api.get("/v1/fleet/health", params={"model": "tiny"})).json()
    assert row["figures"]["requests"] == 60
