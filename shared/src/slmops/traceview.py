"""Traces read back from the JSON-lines span files (``slmops.tracing``), as a text waterfall.

The local stack has no tracing backend: each process appends its finished spans to
``<trace dir>/<service>.jsonl``. A model's journey is one trace over every service and, once
rolled out, over hundreds of gateways, so the waterfall groups spans of the same service and
name under the same parent into one row (``500x``) and keeps the tree readable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BAR_WIDTH = 32
_SERVICE_PREFIX = "slmops-"


@dataclass(frozen=True)
class SpanRecord:
    """One finished span, as the JSON-lines exporter wrote it."""

    trace_id: str
    span_id: str
    parent_id: str | None
    service: str  # without the "slmops-" every service name starts with
    name: str  # event types without their "slmops." prefix
    start_s: float  # POSIX seconds
    end_s: float
    error: bool
    links: tuple[str, ...] = ()  # span ids it links to (a batch consumer's other producers)
    subject: str = ""  # a producer span's NATS subject (messaging.destination.name)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_s - self.start_s)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SpanRecord:
        service = str(doc.get("resource", {}).get("attributes", {}).get("service.name", "?"))
        parent = doc.get("parent_id")
        return cls(
            trace_id=normal_trace_id(doc["context"]["trace_id"]),
            span_id=str(doc["context"]["span_id"]).removeprefix("0x"),
            parent_id=str(parent).removeprefix("0x") if parent else None,
            service=service.removeprefix(_SERVICE_PREFIX),
            name=str(doc.get("name", "?")).replace(" slmops.", " "),  # every event type has it
            start_s=_posix(doc["start_time"]),
            end_s=_posix(doc["end_time"]),
            error=doc.get("status", {}).get("status_code") == "ERROR",
            links=tuple(
                str(link["context"]["span_id"]).removeprefix("0x")
                for link in doc.get("links") or ()
            ),
            subject=str(doc.get("attributes", {}).get("messaging.destination.name", "")),
        )


def normal_trace_id(value: str) -> str:
    """``0xABC…`` or ``abc…`` as the 32 lower-case hex digits W3C and backends show."""
    return value.strip().lower().removeprefix("0x").rjust(32, "0")


def _posix(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def span_files(trace_dir: Path) -> list[Path]:
    return sorted(trace_dir.glob("*.jsonl")) if trace_dir.is_dir() else []


def read_spans(trace_dir: Path, trace_id: str | None = None) -> list[SpanRecord]:
    """Every span under ``trace_dir`` (of one trace if given), oldest first.

    Lines are filtered by substring before parsing: a demo's files hold tens of thousands of
    spans, most of them other traces'. A torn last line (a process killed mid-write) is skipped.
    """
    wanted = normal_trace_id(trace_id) if trace_id else None
    spans: list[SpanRecord] = []
    for path in span_files(trace_dir):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if wanted is not None and wanted not in line:
                    continue
                try:
                    span = SpanRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue
                if wanted is None or span.trace_id == wanted:
                    spans.append(span)
    return sorted(spans, key=lambda s: s.start_s)


@dataclass
class Row:
    """One line of the waterfall: one span, or several alike under the same parent."""

    depth: int
    service: str
    name: str
    spans: list[SpanRecord]
    children: list[Row] = field(default_factory=list)

    @property
    def start_s(self) -> float:
        return min(s.start_s for s in self.spans)

    @property
    def end_s(self) -> float:
        return max(s.end_s for s in self.spans)

    @property
    def errors(self) -> int:
        return sum(s.error for s in self.spans)

    def walk(self) -> Iterator[Row]:
        yield self
        for child in self.children:
            yield from child.walk()


def build_rows(spans: list[SpanRecord]) -> list[Row]:
    """The trace as a tree of rows; spans whose parent is missing (not exported, another
    trace's) become roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else None
        children.setdefault(parent, []).append(span)

    def rows(group: Iterable[SpanRecord], depth: int) -> list[Row]:
        alike: dict[tuple[str, str], list[SpanRecord]] = {}
        for span in sorted(group, key=lambda s: s.start_s):
            alike.setdefault((span.service, span.name), []).append(span)
        built = []
        for (service, name), members in alike.items():
            below = [c for m in members for c in children.get(m.span_id, [])]
            built.append(Row(depth, service, name, members, rows(below, depth + 1)))
        return sorted(built, key=lambda r: r.start_s)

    return rows(children.get(None, []), 0)


def format_duration(seconds: float) -> str:
    """A duration as people read it: ms below a second, s below two minutes, then min."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _bar(start_s: float, end_s: float, origin_s: float, total_s: float) -> str:
    scale = BAR_WIDTH / total_s if total_s > 0 else 0.0
    left = min(BAR_WIDTH - 1, int((start_s - origin_s) * scale))
    width = max(1, round((end_s - start_s) * scale))
    return " " * left + "█" * min(width, BAR_WIDTH - left) + " " * max(0, BAR_WIDTH - left - width)


def render_waterfall(spans: list[SpanRecord]) -> str:
    """The text waterfall: offset from the trace's start, duration, service, name, bar."""
    if not spans:
        return ""
    roots = build_rows(spans)
    origin = min(s.start_s for s in spans)
    total = max(s.end_s for s in spans) - origin
    services = sorted({s.service for s in spans})
    lines = [
        f"trace {spans[0].trace_id} · {len(spans)} spans · {len(services)} services "
        f"({', '.join(services)}) · {format_duration(total)}",
        f"{'start':>10}  {'duration':>10}  {'service':<10} {'span':<56} timeline",
    ]
    for root in roots:
        for row in root.walk():
            count = f"{len(row.spans)}x " if len(row.spans) > 1 else ""
            failed = f" ({row.errors} failed)" if row.errors else ""
            label = ("  " * row.depth + count + row.name + failed)[:56]
            start, took = row.start_s - origin, row.end_s - row.start_s
            lines.append(
                f"{format_duration(start):>10}  {format_duration(took):>10}"
                f"  {row.service:<10} {label:<56} |{_bar(row.start_s, row.end_s, origin, total)}|"
            )
    return "\n".join(lines)


def summarize_traces(spans: list[SpanRecord]) -> list[dict[str, Any]]:
    """One entry per trace, newest first: its root span, services, span count, duration."""
    by_trace: dict[str, list[SpanRecord]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    summaries = []
    for trace_id, members in by_trace.items():
        ids = {s.span_id for s in members}
        roots = [s for s in members if s.parent_id not in ids] or members
        first = min(roots, key=lambda s: s.start_s)
        summaries.append({
            "trace_id": trace_id,
            "root": f"{first.service}: {first.name}",
            "services": sorted({s.service for s in members}),
            "spans": len(members),
            "started_at": datetime.fromtimestamp(first.start_s).astimezone().isoformat(),
            "duration_s": round(max(s.end_s for s in members) - first.start_s, 3),
        })  # fmt: skip
    return sorted(summaries, key=lambda t: str(t["started_at"]), reverse=True)
