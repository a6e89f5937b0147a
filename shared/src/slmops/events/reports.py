"""Gateway reports as events: one gateway's own, or a site's batch of them.

A gateway sends each report as its own event; a publisher speaking for a site's gateways (a
fleet simulator today, a site relay beside a leaf node) may send their wave reports as one
:class:`~slmops.events.GatewayReports` batch. Consumers fold both the same way: ``each_report``
lists the reports of both, each with the id and time of what carried it; consumers that need
only the reports (and who carried them) take ``reports_in``.

A site's batch speaks for gateways the site's relay heard, each on a subject only that gateway
may publish to. A relay taken over could still write anything into a batch, so consumers take
a batched report only for a gateway that declared that site itself, in its own messages, and
with the labels and class it declared (``may_carry``): a site answers for its own gateways'
wave reports and nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    """A gateway report, the id and time of the event that carried it, and the site whose
    batch carried it (``None``: the gateway's own event)."""

    report: GatewayReport
    event_id: str
    time: datetime
    site: str | None = None


class Carried(NamedTuple):
    """A gateway report and the site whose batch carried it (``None``: its own event)."""

    report: GatewayReport
    site: str | None = None


SITE_LABEL = "site"  # the label a gateway declares its site with


def may_carry(
    site: str, report: GatewayReport, declared: tuple[str, Mapping[str, str]] | None
) -> bool:
    """Whether ``site``'s batch may carry ``report``: its gateway ``declared`` (its class and
    labels, as its own messages said them; ``None``: unknown) that site, and the report says
    the same class and labels."""
    if declared is None:
        return False
    device_class, labels = declared
    return (labels.get(SITE_LABEL) == site and report.device_class == device_class
            and report.labels == labels)  # fmt: skip


def each_report(events: Iterable[CloudEvent[Any]]) -> list[StampedReport]:
    """Every gateway report in ``events``, in order, stamped: a report event's own id and
    time; a batch's reports with the batch's time and its id plus their place in it (folds
    order by time and id; none dedupes by it). Other events are left out."""
    found: list[StampedReport] = []
    for event in events:
        if isinstance(event.data, GatewayReport):
            found.append(StampedReport(event.data, event.id, event.time))
        elif isinstance(event.data, GatewayReports):
            site = event.data.site
            found += [StampedReport(r, f"{event.id}/{i}", event.time, site)
                      for i, r in enumerate(event.data.reports)]  # fmt: skip
    return found


def reports_in(events: Iterable[CloudEvent[Any]]) -> list[Carried]:
    """``each_report``'s payloads and sites alone (no event id built per batched report)."""
    found: list[Carried] = []
    for event in events:
        if isinstance(event.data, GatewayReport):
            found.append(Carried(event.data))
        elif isinstance(event.data, GatewayReports):
            site = event.data.site
            found += [Carried(r, site) for r in event.data.reports]
    return found
