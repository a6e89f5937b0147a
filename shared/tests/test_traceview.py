"""Traces read back from span files and drawn as a waterfall (slmops.traceview): real spans,
exported by the SDK's JSON-lines exporter through a real tracer provider."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.trace import SpanKind
from typer.testing import CliRunner

from slmops.cli.main import app
from slmops.traceview import build_rows, read_spans, render_waterfall, summarize_traces
from slmops.tracing import extract_trace_context, setup_tracing, w3c_trace_headers


def _journey(trace_dir: Path, gateways: int) -> str:
    """A publish in one 'service', handled in another, fanned out to ``gateways`` consumers
    in a third: three providers writing their own files, one trace through headers."""
    registry = setup_tracing("slmops-registry", trace_dir=trace_dir)
    rollout = setup_tracing("slmops-rollout", trace_dir=trace_dir)
    fleet = setup_tracing("slmops-fleetsim", trace_dir=trace_dir)
    tracer = registry.get_tracer("t")
    with (
        tracer.start_as_current_span("POST /v1/models") as root,
        tracer.start_as_current_span("publish slmops.release.created.v1", kind=SpanKind.PRODUCER)
        as published,
    ):  # fmt: skip
        headers = w3c_trace_headers(published.get_span_context())
    with rollout.get_tracer("t").start_as_current_span(
        "process slmops.release.created.v1", context=extract_trace_context(headers)
    ):
        for _ in range(gateways):
            with rollout.get_tracer("t").start_as_current_span(
                "publish slmops.gateway.assignment.v1"
            ) as assignment:
                to_gateway = w3c_trace_headers(assignment.get_span_context())
            fleet.get_tracer("t").start_span(
                "process slmops.gateway.assignment.v1", context=extract_trace_context(to_gateway)
            ).end()
    with registry.get_tracer("t").start_as_current_span("GET /v1/models"):  # another trace
        pass
    for provider in (registry, rollout, fleet):
        provider.shutdown()  # flushes the batch processors to the files
    return f"{root.get_span_context().trace_id:032x}"


def test_one_trace_is_read_back_from_every_service_file(tmp_path: Path) -> None:
    trace_id = _journey(tmp_path, gateways=3)

    spans = read_spans(tmp_path, trace_id)

    assert {s.service for s in spans} == {"registry", "rollout", "fleetsim"}
    assert len(spans) == 2 + 1 + 3 + 3  # the other trace's span is not read
    assert all(s.trace_id == trace_id for s in spans)
    assert [s.name for s in spans][:2] == ["POST /v1/models", "publish release.created.v1"]


def test_alike_spans_under_one_parent_are_one_row(tmp_path: Path) -> None:
    trace_id = _journey(tmp_path, gateways=50)

    (root,) = build_rows(read_spans(tmp_path, trace_id))
    rows = [(r.depth, r.service, r.name, len(r.spans)) for r in root.walk()]

    assert rows == [
        (0, "registry", "POST /v1/models", 1),
        (1, "registry", "publish release.created.v1", 1),
        (2, "rollout", "process release.created.v1", 1),
        (3, "rollout", "publish gateway.assignment.v1", 50),
        (4, "fleetsim", "process gateway.assignment.v1", 50),
    ]
    drawn = render_waterfall(read_spans(tmp_path, trace_id))
    assert f"trace {trace_id} · 103 spans · 3 services" in drawn
    assert "50x process gateway.assignment.v1" in drawn


def test_a_torn_line_and_a_missing_parent_do_not_hide_the_rest(tmp_path: Path) -> None:
    trace_id = _journey(tmp_path, gateways=2)
    registry_file = tmp_path / "slmops-registry.jsonl"
    lines = registry_file.read_text().splitlines()
    # the root span's line is lost, and a process killed mid-write left half a line
    kept = [line for line in lines if '"POST /v1/models"' not in line]
    registry_file.write_text("\n".join(kept) + '\n{"name": "publish slmo')

    spans = read_spans(tmp_path, trace_id)
    roots = build_rows(spans)

    assert len(spans) == 1 + 1 + 2 + 2
    assert [r.name for r in roots] == ["publish release.created.v1"]  # orphan becomes a root


def test_trace_cli_lists_and_shows_and_says_what_is_wrong(tmp_path: Path) -> None:
    trace_id = _journey(tmp_path, gateways=2)
    runner = CliRunner()

    listed = runner.invoke(app, ["trace", "list", "--trace-dir", str(tmp_path), "--json"])
    shown = runner.invoke(app, ["trace", "show", trace_id, "--trace-dir", str(tmp_path)])
    unknown = runner.invoke(app, ["trace", "show", "0" * 31 + "1", "--trace-dir", str(tmp_path)])
    malformed = runner.invoke(app, ["trace", "show", "nope", "--trace-dir", str(tmp_path)])

    assert listed.exit_code == 0, listed.output
    summaries = {t["trace_id"]: t for t in summarize_traces(read_spans(tmp_path))}
    assert summaries[trace_id]["spans"] == 7
    assert summaries[trace_id]["root"] == "registry: POST /v1/models"
    assert trace_id in listed.output
    assert shown.exit_code == 0, shown.output
    assert "2x process gateway.assignment.v1" in shown.output
    assert unknown.exit_code == 1
    assert "no spans of trace" in unknown.output
    assert malformed.exit_code == 1
    assert "is not a trace id" in malformed.output
