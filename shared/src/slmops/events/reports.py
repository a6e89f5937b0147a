"""Gateway reports as events: one gateway's own, or a site's batch of them.

A gateway sends each report as its own event; a publisher speaking for a site's gateways (a
fleet simulator today, a site relay beside a leaf node) may send their wave reports as one
:class:`~slmops.events.GatewayReports` batch. Consumers fold both the same way: ``each_report``
lists the reports of both, each with the id and time of what carried it; consumers that need
only the reports take ``reports_in``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

from slmops.events.envelope import CloudEvent, derive_event_id, new_event
from slmops.events.payloads import BATCHED_REPORT_KINDS, GatewayReport, GatewayReports


def report_event(report: GatewayReport) -> CloudEvent[GatewayReport]:
    """The event of a report; one id per (gateway, generation, outcome), so a redelivered
    assignment re-sends the same report and JetStream drops the duplicate."""
    source = f"/slmops/gateway/{report.gateway_id}"
    if report.generation is None or report.kind not in BATCHED_REPORT_KINDS:
        return new_event(report, source=source)
    key = f"{report.gateway_id}/{report.generation}/{report.kind}"
    return new_event(report, source=source, event_id=derive_event_id("gateway.report", key))


class StampedReport(NamedTuple):
    """A gateway report, and the id and time of the event that carried it."""

    report: GatewayReport
    event_id: str
    time: datetime


def each_report(events: Iterable[CloudEvent[Any]]) -> list[StampedReport]:
    """Every gateway report in ``events``, in order, stamped: a report event's own id and
    time; a batch's reports with the batch's time and its id plus their place in it (folds
    order by time and id; none dedupes by it). Other events are left out."""
    found: list[StampedReport] = []
    for event in events:
        if isinstance(event.data, GatewayReport):
            found.append(StampedReport(event.data, event.id, event.time))
        elif isinstance(event.data, GatewayReports):
            found += [StampedReport(r, f"{event.id}/{i}", event.time)
                      for i, r in enumerate(event.data.reports)]  # fmt: skip
    return found


def reports_in(events: Iterable[CloudEvent[Any]]) -> list[GatewayReport]:
    """``each_report``'s payloads alone (no envelope built per batched report)."""
    found: list[GatewayReport] = []
    for event in events:
        if isinstance(event.data, GatewayReport):
            found.append(event.data)
        elif isinstance(event.data, GatewayReports):
            found += event.data.reports
    return found
