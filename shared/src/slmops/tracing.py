"""OpenTelemetry per service, and W3C trace context through NATS headers.

Each service gets its own ``TracerProvider`` (resource ``service.name``) that is passed around
explicitly, so several services can share one process in tests without fighting over the global
provider. Exporters: OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the standard
variable), JSON lines under ``SLMOPS_TRACE_DIR`` for the local stack, and any extra exporter a
caller passes (tests use the in-memory one).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from slmops import __version__


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans as JSON lines to ``<dir>/<service>.jsonl`` (local stack only)."""

    def __init__(self, directory: Path, service_name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / f"{service_name}.jsonl"
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [span.to_json(indent=None) for span in spans]
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def setup_tracing(
    service_name: str,
    *,
    trace_dir: Path | None = None,
    extra_exporter: SpanExporter | None = None,
) -> TracerProvider:
    """A tracer provider for one service; also installed globally if none is installed yet."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.version": __version__})
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        # Imported here: the exporter pulls in protobuf and requests, useless without a backend.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if trace_dir is not None:
        provider.add_span_processor(
            BatchSpanProcessor(JsonLinesSpanExporter(trace_dir, service_name))
        )
    if extra_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(extra_exporter))
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)
    return provider


def inject_trace_headers(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Adds ``traceparent``/``tracestate`` of the current span to NATS headers."""
    inject(headers)
    return headers


def extract_trace_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The remote parent context carried in NATS headers (empty context if none)."""
    return extract(dict(headers or {}))


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
