"""A site's wave reports sent as batches (real NATS): every report stored once, in batches of
at most ``max_reports`` or what came within ``linger_s``; a batch that cannot be stored fails
every report in it, so each agent acts again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import GatewayReport, GatewayReports, decode_message
from slmops.events.reports import reports_in
from slmops.testing.events import stored_messages
from slmops_gateway.sitereports import SiteReporter

pytestmark = [pytest.mark.integration]


def _report(i: int) -> GatewayReport:
    return GatewayReport(gateway_id=f"gw-{i}", kind="applied", device_class="cpu",
                         rollout_id="ro-1", variant_id="v-1", generation=3)  # fmt: skip


async def test_reports_go_out_in_batches_and_each_sender_waits_for_its_own(bus: Bus) -> None:
    reporter = SiteReporter(bus, "site-1", max_reports=3, linger_s=0.05)

    await asyncio.gather(*(reporter.send(_report(i)) for i in range(7)))  # all stored

    msgs = await stored_messages(bus, "slmops.gateway.reports.v1.site-1.>")
    batches = [decode_message(m.subject, m.data or b"") for m in msgs]
    assert sorted(len(b.data.reports) for b in batches) == [1, 3, 3]
    assert all(isinstance(b.data, GatewayReports) for b in batches)
    gateways = sorted(c.report.gateway_id for c in reports_in(batches))
    assert gateways == sorted(f"gw-{i}" for i in range(7))
    assert reporter.batches_sent == 3


class _BrokerAway:
    async def publish(self, event: Any) -> None:
        raise ConnectionError("no servers available")


async def test_a_batch_that_cannot_be_stored_fails_every_report_in_it() -> None:
    reporter = SiteReporter(_BrokerAway(), "site-1", max_reports=2)  # type: ignore[arg-type]

    results = await asyncio.gather(reporter.send(_report(1)), reporter.send(_report(2)),
                                   return_exceptions=True)  # fmt: skip

    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    assert reporter.batches_sent == 0


def test_a_batch_size_beyond_the_contract_is_refused() -> None:
    with pytest.raises(ValueError, match="max_reports"):
        SiteReporter(_BrokerAway(), "s", max_reports=5000)  # type: ignore[arg-type]
