"""Traces as waterfalls, read from the span files of the local stack (``SLMOPS_TRACE_DIR``).

Deployments with a tracing backend (Jaeger, Tempo) read traces there; the console shows what
the local stack's JSON-lines exporter wrote.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from slmops.traceview import build_rows, format_duration, normal_trace_id, read_spans
from slmops.traceview import summarize_traces as summarize
from slmops_console.rendering import SettingsDep, render
from slmops_console.session import SignedIn

router = APIRouter(include_in_schema=False)
MAX_TRACES = 200


@router.get("/traces", response_class=HTMLResponse)
async def traces(request: Request, session: SignedIn, settings: SettingsDep) -> HTMLResponse:
    spans = await asyncio.to_thread(read_spans, settings.platform.span_files_dir())
    found = [
        {
            **t,
            "started": str(t["started_at"])[:19].replace("T", " "),
            "duration": format_duration(float(t["duration_s"])),
            "errors": 0,
        }
        for t in summarize(spans)[:MAX_TRACES]
    ]
    errors: dict[str, int] = {}
    for span in spans:
        errors[span.trace_id] = errors.get(span.trace_id, 0) + span.error
    for t in found:
        t["errors"] = errors.get(t["trace_id"], 0)
    return render(request, "traces.html", session, nav="traces", traces=found)


@router.get("/traces/{trace_id}", response_class=HTMLResponse)
async def trace(
    trace_id: str, request: Request, session: SignedIn, settings: SettingsDep
) -> HTMLResponse:
    wanted = normal_trace_id(trace_id)
    spans = await asyncio.to_thread(read_spans, settings.platform.span_files_dir(), wanted)
    if not spans:
        raise HTTPException(404, f"no spans of trace {wanted} (yet)")
    origin = min(s.start_s for s in spans)
    total = max(s.end_s for s in spans) - origin or 1e-9
    rows: list[dict[str, Any]] = []
    for root in build_rows(spans):
        for row in root.walk():
            start, end = row.start_s - origin, row.end_s - origin
            rows.append(
                {
                    "depth": row.depth,
                    "name": row.name,
                    "service": row.service,
                    "count": len(row.spans),
                    "errors": row.errors,
                    "offset": format_duration(start),
                    "duration": format_duration(end - start),
                    "left_pct": round(100 * start / total, 2),
                    "width_pct": max(0.3, round(100 * (end - start) / total, 2)),
                }
            )
    return render(
        request,
        "trace.html",
        session,
        nav="traces",
        trace_id=wanted,
        rows=rows,
        span_count=len(spans),
        total=format_duration(total),
    )
