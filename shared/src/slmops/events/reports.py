"""Gateway reports as events: one gateway's own, or a site's batch of them.

A gateway sends each report as its own event; a publisher speaking for a site's gateways (a
fleet simulator today, a site relay beside a leaf node) may send their wave reports as one
:class:`~slmops.events.GatewayReports` batch. Consumers fold both the same way: ``each_report``
turns a batch back into the events its gateways would have sent - the same ids (so a report
sent both ways is folded once), the batch's time and trace.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from slmops.events.envelope import CloudEvent, derive_event_id, event_model, new_event
from slmops.events.payloads import BATCHED_REPORT_KINDS, GatewayReport, GatewayReports

_REPORT_EVENT = event_model(GatewayReport)


def report_event(report: GatewayReport) -> CloudEvent[GatewayReport]:
    """The event of a report; one id per (gateway, generation, outcome), so a redelivered
    assignment re-sends the same report and JetStream drops the duplicate."""
    source = f"/slmops/gateway/{report.gateway_id}"
    event_id = wave_report_id(report)
    return new_event(report, source=source, event_id=event_id)


def wave_report_id(report: GatewayReport) -> str | None:
    """The id of a wave report (None for others: each is new)."""
    if report.generation is None or report.kind not in BATCHED_REPORT_KINDS:
        return None
    key = f"{report.gateway_id}/{report.generation}/{report.kind}"
    return derive_event_id("gateway.report", key)


def each_report(events: Iterable[CloudEvent[Any]]) -> list[CloudEvent[GatewayReport]]:
    """Every gateway report in ``events``, in order: report events as they are, a batch as
    one event per report it carries (other events are left out)."""
    found: list[CloudEvent[GatewayReport]] = []
    for event in events:
        if isinstance(event.data, GatewayReport):
            found.append(event)
        elif isinstance(event.data, GatewayReports):
            found += _unbatched(event.data, event.time, event.traceparent)
    return found


def _unbatched(
    batch: GatewayReports, time: datetime, traceparent: str | None
) -> list[CloudEvent[GatewayReport]]:
    return [
        _REPORT_EVENT(
            id=wave_report_id(report) or f"{batch.site}/{batch.batch}/{i}",
            source=f"/slmops/gateway/{report.gateway_id}",
            type=GatewayReport.event_type,
            time=time,
            traceparent=traceparent,
            data=report,
        )
        for i, report in enumerate(batch.reports)
    ]
