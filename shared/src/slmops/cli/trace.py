"""`slmops trace show|list`: a model's journey as a text waterfall, from the span files the
local stack keeps (``$SLMOPS_TRACE_DIR``, else ``var/traces``). With
``OTEL_EXPORTER_OTLP_ENDPOINT`` set the services also send their spans to that backend: look
the same trace id up there."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from slmops.cli.common import console_out, fail
from slmops.settings import PlatformSettings
from slmops.traceview import normal_trace_id, read_spans, render_waterfall, summarize_traces

app = typer.Typer(help="Traces of models' journeys, from the locally kept spans.",
                  no_args_is_help=True)  # fmt: skip
_TRACE_ID = re.compile(r"(0x)?[0-9a-fA-F]{32}")

TraceDir = Annotated[
    Path | None,
    typer.Option("--trace-dir", help="Span files' folder (default: $SLMOPS_TRACE_DIR, else "
                 "var/traces).", show_default=False),
]  # fmt: skip
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _folder(trace_dir: Path | None) -> Path:
    folder = trace_dir or PlatformSettings().span_files_dir()
    if not folder.is_dir():
        fail(f"no span files in {folder}: run `slmops up` (it keeps spans there) or pass "
              "--trace-dir")  # fmt: skip
    return folder


@app.command()
def show(
    trace_id: Annotated[str, typer.Argument(help="32 hex digits (`slmops trace list`).")],
    json_output: JsonOutput = False,
    trace_dir: TraceDir = None,
) -> None:
    """Print one trace as a waterfall: every service's spans, alike ones grouped (Nx)."""
    if not _TRACE_ID.fullmatch(trace_id.strip()):
        fail(f"{trace_id!r} is not a trace id (32 hex digits, as `slmops trace list` shows)")
    folder = _folder(trace_dir)
    spans = read_spans(folder, trace_id)
    if not spans:
        fail(f"no spans of trace {normal_trace_id(trace_id)} in {folder} (spans are "
              "written a second after they end; `slmops trace list` shows those kept)")  # fmt: skip
    if json_output:
        print(json.dumps([asdict(s) for s in spans], indent=2))
        return
    console_out.print(render_waterfall(spans), markup=False, soft_wrap=True)


@app.command("list")
def list_traces(
    limit: Annotated[int, typer.Option(help="Newest N traces.")] = 20,
    services: Annotated[int, typer.Option("--min-services",
                                          help="Only traces over this many services.")] = 1,
    json_output: JsonOutput = False,
    trace_dir: TraceDir = None,
) -> None:  # fmt: skip
    """List the newest traces: root span, services, spans, duration."""
    found = [t for t in summarize_traces(read_spans(_folder(trace_dir)))
             if len(t["services"]) >= services][:limit]  # fmt: skip
    if json_output:
        print(json.dumps(found, indent=2))
        return
    table = Table(title="traces, newest first", title_justify="left")
    table.add_column("trace id", no_wrap=True, min_width=32)
    for column in ("root", "services", "spans", "duration s"):
        table.add_column(column)
    for t in found:
        table.add_row(t["trace_id"], t["root"], ",".join(t["services"]), str(t["spans"]),
                      f"{t['duration_s']:.2f}")  # fmt: skip
    console_out.print(table, soft_wrap=False)
