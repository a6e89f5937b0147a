"""Tracing per service: resource names, W3C headers, exporters, FastAPI spans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import get_current_span

from slmops.service import ServiceRuntime, create_service_app
from slmops.settings import PlatformSettings, ServiceSettings
from slmops.tracing import extract_trace_context, setup_tracing, w3c_trace_headers


def test_w3c_headers_round_trip_through_extract() -> None:
    provider = setup_tracing("slmops-test", extra_exporter=InMemorySpanExporter())
    with provider.get_tracer("t").start_as_current_span("outer") as span:
        headers = w3c_trace_headers(span.get_span_context())

    parent = extract_trace_context(headers)

    assert parent is not None
    remote = get_current_span(parent).get_span_context()
    assert remote.is_remote
    assert remote.trace_id == span.get_span_context().trace_id
    assert remote.span_id == span.get_span_context().span_id
    assert headers["traceparent"].startswith(f"00-{remote.trace_id:032x}-")


@pytest.mark.parametrize(
    "traceparent",
    ["garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "01-abc", ""],
    ids=["garbage", "zero-trace-id", "short", "empty"],
)
def test_malformed_traceparent_counts_as_absent(traceparent: str) -> None:
    assert extract_trace_context({"traceparent": traceparent}) is None


def test_spans_carry_the_service_name_and_go_to_the_trace_dir(tmp_path: Path) -> None:
    memory = InMemorySpanExporter()
    provider = setup_tracing("slmops-registry", trace_dir=tmp_path, extra_exporter=memory)

    with provider.get_tracer("t").start_as_current_span("work"):
        pass
    provider.force_flush()

    (span,) = memory.get_finished_spans()
    assert span.resource.attributes["service.name"] == "slmops-registry"
    lines = (tmp_path / "slmops-registry.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["name"] == "work"


def test_otlp_exporter_is_added_only_when_an_endpoint_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    without = setup_tracing("a")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    with_endpoint = setup_tracing("b")

    def exporters(provider: object) -> list[str]:
        processors = provider._active_span_processor._span_processors  # type: ignore[attr-defined]
        return [
            type(p.span_exporter).__name__ for p in processors if isinstance(p, BatchSpanProcessor)
        ]

    assert exporters(without) == []
    assert exporters(with_endpoint) == ["OTLPSpanExporter"]
    with_endpoint.shutdown()


def test_http_requests_are_traced_with_the_service_name() -> None:
    memory = InMemorySpanExporter()
    settings = ServiceSettings(platform=PlatformSettings(nats_url="nats://127.0.0.1:1"))
    runtime = ServiceRuntime(
        "registry",
        settings,
        uses_object_store=False,
        tracer_provider=setup_tracing("slmops-registry", extra_exporter=memory),
    )
    app = create_service_app(runtime, title="t")

    with TestClient(app) as client:
        alive = client.get("/healthz")
        client.get("/v1/runtime")
        not_ready = client.get("/readyz")

    assert alive.status_code == 200
    assert not_ready.status_code == 503
    assert not_ready.json()["not_ready"] == ["nats", "topology"]
    names = [s.name for s in memory.get_finished_spans()]
    assert "GET /v1/runtime" in names
    assert not any("healthz" in n or "readyz" in n for n in names)  # probes are not traced
