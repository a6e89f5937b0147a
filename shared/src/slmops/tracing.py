"""OpenTelemetry per service, and W3C trace context through NATS headers.

Each service gets its own ``TracerProvider`` (resource ``service.name``) that is passed around
explicitly, so several services can share one process in tests without fighting over the global
provider. Exporters: OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the standard
variable), JSON lines under ``SLMOPS_TRACE_DIR`` for the local stack, and any extra exporter a
caller passes (tests use the in-memory one).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from slmops import __version__

_TRACEPARENT = re.compile(
    r"00-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
)


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
        # Written within a second (not the default 5 s): `slmops trace show` right after a
        # rollout completes should find its last spans.
        exporter = JsonLinesSpanExporter(trace_dir, service_name)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    if extra_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(extra_exporter))
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)
    return provider


def w3c_trace_headers(span_context: SpanContext) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of a span, per W3C Trace Context.

    Formatted directly rather than through the global propagator: it is on every publish, and
    the propagator costs several times more for the same two strings.
    """
    if not span_context.is_valid:
        return {}
    headers = {
        "traceparent": f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{span_context.trace_flags:02x}"
    }
    if span_context.trace_state:
        headers["tracestate"] = span_context.trace_state.to_header()
    return headers


def current_traceparent() -> str | None:
    """The ``traceparent`` of the span current here, or None outside any recorded span.

    Work that continues later, away from this call stack (a rollout's next wave, started by a
    timer), keeps it to join the same trace again with :func:`extract_trace_context`.
    """
    return w3c_trace_headers(trace.get_current_span().get_span_context()).get("traceparent")


def extract_trace_context(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The remote parent context carried in ``traceparent``/``tracestate`` headers, or None.

    Parsed directly (see :func:`w3c_trace_headers`); malformed values count as absent.
    """
    if not headers or "traceparent" not in headers:
        return None
    match = _TRACEPARENT.fullmatch(headers["traceparent"].strip().lower())
    if match is None or match["trace_id"] == "0" * 32 or match["span_id"] == "0" * 16:
        return None
    state = headers.get("tracestate")
    remote = SpanContext(
        trace_id=int(match["trace_id"], 16),
        span_id=int(match["span_id"], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(match["flags"], 16)),
        trace_state=TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))
