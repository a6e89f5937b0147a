"""Each service's Prometheus metrics: own registry, consumer outcomes, refreshers, /metrics."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from slmops.auth import LocalCredentials, scopes_of_role
from slmops.bus import Bus, Handlers
from slmops.bus.consumer import EventConsumer
from slmops.events import CloudEvent, ModelPublished
from slmops.service import ServiceRuntime, create_service_app
from slmops.service.metrics import CONTENT_TYPE, HttpMetricsMiddleware, ServiceMetrics
from slmops.settings import PlatformSettings, ServiceSettings
from slmops.testing.consumers import fast_consumer_settings
from slmops.testing.factories import model_published
from slmops.testing.polling import until

PUBLISHED = ModelPublished.event_type


def events(metrics: ServiceMetrics, outcome: str, consumer: str = "svc-pipeline") -> float:
    labels = {"type": PUBLISHED, "consumer": consumer, "outcome": outcome}
    return metrics.registry.get_sample_value("slmops_events_total", labels) or 0.0


def test_two_services_in_one_process_count_apart() -> None:
    a, b = ServiceMetrics("a"), ServiceMetrics("b")  # same family names, no collision

    a.count("a-pipeline", PUBLISHED, "handled")
    a.time(PUBLISHED, 0.02)

    assert a.registry.get_sample_value(
        "slmops_events_total", {"type": PUBLISHED, "consumer": "a-pipeline", "outcome": "handled"}
    ) == 1.0  # fmt: skip
    assert a.registry.get_sample_value(
        "slmops_event_handler_duration_seconds_bucket", {"type": PUBLISHED, "le": "0.025"}
    ) == 1.0  # fmt: skip
    assert b.registry.get_sample_value(
        "slmops_events_total", {"type": PUBLISHED, "consumer": "a-pipeline", "outcome": "handled"}
    ) is None  # fmt: skip


def test_sample_names_cover_every_family_even_before_a_sample() -> None:
    names = ServiceMetrics("a").sample_names()

    assert {"slmops_events_total", "slmops_event_handler_duration_seconds_bucket",
            "slmops_event_handler_duration_seconds_count", "slmops_consumer_pending_messages",
            "slmops_http_requests_total", "slmops_service_info"} <= names  # fmt: skip


async def test_refreshers_run_before_a_scrape_at_most_every_interval() -> None:
    metrics = ServiceMetrics("a")
    runs: list[int] = []

    async def refresh() -> None:
        runs.append(len(runs))
        metrics.consumer_pending.labels("a-pipeline").set(len(runs))

    metrics.add_refresher("pending", refresh, min_interval_s=3600)
    first = (await metrics.render()).decode()
    await metrics.render()

    assert runs == [0]
    assert 'slmops_consumer_pending_messages{consumer="a-pipeline"} 1.0' in first


async def test_a_failing_or_hanging_refresher_leaves_the_last_values() -> None:
    metrics = ServiceMetrics("a", refresh_timeout_s=0.1)
    metrics.consumer_pending.labels("a-pipeline").set(7)
    never = asyncio.Event()

    async def broken() -> None:
        raise ConnectionError("NATS away")

    async def hangs() -> None:
        await never.wait()

    metrics.add_refresher("broken", broken)
    metrics.add_refresher("hangs", hangs)
    text = (await metrics.render()).decode()

    assert 'slmops_consumer_pending_messages{consumer="a-pipeline"} 7.0' in text


async def test_http_requests_are_counted_by_route_template_never_by_path() -> None:
    metrics = ServiceMetrics("a")
    app = FastAPI()

    @app.get("/v1/rollouts/{rollout_id}")
    async def one(rollout_id: str) -> dict[str, str]:
        return {"id": rollout_id}

    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://a") as client:
        for rollout_id in ("ro-1", "ro-2"):
            assert (await client.get(f"/v1/rollouts/{rollout_id}")).status_code == 200
        assert (await client.get("/nowhere/gw-0001")).status_code == 404

    value = metrics.registry.get_sample_value
    labels = {"route": "/v1/rollouts/{rollout_id}", "method": "GET", "status": "200"}
    assert value("slmops_http_requests_total", labels) == 2.0
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert value("slmops_http_requests_total", unmatched) == 1.0
    text = (await metrics.render()).decode()
    assert "gw-0001" not in text
    assert "ro-1" not in text


@pytest.fixture
def app(credentials: LocalCredentials) -> FastAPI:
    platform = PlatformSettings(var_dir=credentials.root.parent, nats_url="nats://127.0.0.1:1")
    runtime = ServiceRuntime(
        "registry", ServiceSettings(platform=platform), uses_object_store=False
    )
    return create_service_app(runtime, title="t")


def test_metrics_route_wants_the_metrics_scope(app: FastAPI, credentials: LocalCredentials) -> None:
    client = TestClient(app)  # no lifespan: the route answers without NATS
    viewer = credentials.issuer().mint("user:viewer", scopes_of_role("viewer"), ttl_s=60)
    admin = credentials.token("admin")

    def scrape(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return client.get("/metrics", headers=headers).status_code

    scraper = {"Authorization": f"Bearer {credentials.token('metrics')}"}
    answer = client.get("/metrics", headers=scraper)

    assert (scrape(None), scrape(viewer), scrape(admin)) == (401, 403, 200)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == CONTENT_TYPE
    assert 'slmops_service_info{service="registry",version="0.1.0"} 1.0' in answer.text
    assert "# TYPE slmops_events_total counter" in answer.text
    assert app.state.metrics is app.state.runtime.metrics


@pytest.mark.integration
async def test_a_consumer_reports_each_outcome_and_handler_time(bus: Bus) -> None:
    metrics = ServiceMetrics("svc")
    attempts: list[str] = []

    async def flaky(event: CloudEvent[ModelPublished]) -> None:
        attempts.append(event.id)
        if len(attempts) == 1:
            raise ConnectionError("object store unavailable")

    handlers = Handlers()
    handlers.register(ModelPublished, flaky)
    settings = fast_consumer_settings(max_deliver=3)
    # A gateway's durable carries its id; the metrics label is the service's name on the stream.
    (spec,) = handlers.consumer_specs("svc-gw-0001", ack_wait_s=5.0, max_deliver=3)
    await bus.declare_consumer(spec)
    consumer = EventConsumer(bus, spec, handlers, settings, observer=metrics, service="svc")
    await consumer.start()
    try:
        await bus.publish(model_published())
        await until(lambda: events(metrics, "handled") == 1, "the retried event handled")
        await bus.js.publish(PUBLISHED, b"\xff not json")
        await until(lambda: _unknown_dead_lettered(metrics) == 1, "the poison dead-lettered")
    finally:
        await consumer.stop()

    assert consumer.label == "svc-pipeline"
    assert events(metrics, "retried") == 1
    timed = metrics.registry.get_sample_value(
        "slmops_event_handler_duration_seconds_count", {"type": PUBLISHED}
    )
    assert timed == 2.0  # the failed run and the successful one


def _unknown_dead_lettered(metrics: ServiceMetrics) -> float:
    labels = {"type": "unknown", "consumer": "svc-pipeline", "outcome": "dead_lettered"}
    return metrics.registry.get_sample_value("slmops_events_total", labels) or 0.0
