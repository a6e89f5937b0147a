"""A site's relay (real NATS): it carries its gateways' wave reports as the site's batches and
answers each gateway once its batch is stored; it refuses what is not the sender's own wave
report of its site; a gateway without an answer learns why (and publishes itself)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.bus.permissions import relay_subject
from slmops.events import GatewayReport, GatewayReports, decode_message
from slmops.events.reports import reports_in
from slmops.service.registry_api import RegistryClient
from slmops.settings import PlatformSettings
from slmops.testing.events import stored_messages
from slmops_gateway.agent import Agent
from slmops_gateway.app import AgentLoop
from slmops_gateway.relay import SiteRelay, send_via_relay
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.sitereports import SiteReporter

pytestmark = [pytest.mark.integration]
SITE = "berlin-1"


def _report(gateway: str, kind: str = "applied", site: str = SITE) -> GatewayReport:
    return GatewayReport(gateway_id=gateway, kind=kind, device_class="cpu",  # type: ignore[arg-type]
                         labels={"site": site}, rollout_id="ro-1", variant_id="v-1",
                         generation=3)  # fmt: skip


def _key(report: GatewayReport) -> tuple[str, str]:
    return report.gateway_id, report.kind


@pytest.fixture
async def relay(bus: Bus) -> AsyncIterator[SiteRelay]:
    running = SiteRelay(bus.nc, SiteReporter(bus, SITE, max_reports=4, linger_s=0.02))
    await running.start()
    yield running
    await running.stop()


async def test_gateways_reports_are_carried_in_batches_and_each_answered_once_stored(
    bus: Bus, relay: SiteRelay
) -> None:
    reports = [_report(f"gw-{i}", kind) for i in range(5) for kind in ("acknowledged", "applied")]

    answers = await asyncio.gather(*(send_via_relay(bus.nc, SITE, r, 5.0) for r in reports))

    assert answers == [None] * 10  # every one stored
    stored = await stored_messages(bus, f"slmops.gateway.reports.v1.{SITE}.>")
    batches = [decode_message(m.subject, m.data or b"") for m in stored]
    assert all(isinstance(b.data, GatewayReports) and b.data.site == SITE for b in batches)
    assert sorted(len(b.data.reports) for b in batches) == [2, 4, 4]  # at most 4 per batch
    carried = [c.report for c in reports_in(batches)]
    assert sorted(carried, key=_key) == sorted(reports, key=_key)
    assert (relay.carried, relay.refused) == (10, 0)


@pytest.mark.parametrize(
    ("sender", "body", "why"),
    [
        ("gw-2", _report("gw-1").model_dump_json(), "a report of gw-1 sent by gw-2"),
        ("gw-1", _report("gw-1", "health").model_dump_json(), "health reports are not carried"),
        ("gw-1", _report("gw-1", site="paris").model_dump_json(), "do not name site berlin-1"),
        ("gw-1", '{"gateway_id": "gw-1"}', "not a gateway report"),
    ],
)
async def test_what_is_not_the_senders_own_wave_report_of_the_site_is_refused(
    bus: Bus, relay: SiteRelay, sender: str, body: str, why: str
) -> None:
    reply = await bus.nc.request(relay_subject(SITE, sender), body.encode(), timeout=5)

    assert why in json.loads(reply.data)["refused"]
    assert (relay.carried, relay.refused) == (0, 1)


async def test_without_a_relay_the_gateway_learns_why(bus: Bus) -> None:
    why = await send_via_relay(bus.nc, "nowhere", _report("gw-1", site="nowhere"), 1.0)
    assert why == "no relay of site nowhere is running"


class _BrokerAway:
    async def publish(self, event: Any) -> None:
        raise ConnectionError("no servers available")


async def test_a_batch_not_stored_is_answered_so_each_gateway_publishes_itself(bus: Bus) -> None:
    relay = SiteRelay(bus.nc, SiteReporter(_BrokerAway(), SITE))  # type: ignore[arg-type]
    await relay.start()
    try:
        why = await send_via_relay(bus.nc, SITE, _report("gw-1"), 5.0)
    finally:
        await relay.stop()
    assert why == "not stored: no servers available"
    assert relay.carried == 0


async def test_a_gateway_at_a_site_reports_through_its_relay_or_itself_without_one(
    bus: Bus, relay: SiteRelay, tmp_path: Path
) -> None:
    settings = GatewaySettings(platform=PlatformSettings(), gateway_id="gw-9", site=SITE,
                               models_dir=tmp_path, relay_timeout_s=2.0)  # fmt: skip
    agent = Agent(settings, RegistryClient("http://127.0.0.1:9"))
    loop = AgentLoop(agent, SimpleNamespace(bus=bus))  # type: ignore[arg-type]
    await loop._publish(agent.report("acknowledged", rollout_id="ro-1", generation=1))
    await loop._publish(agent.report("registered"))  # never through the relay
    await relay.stop()  # the relay goes away: the gateway publishes its outcome itself
    await loop._publish(agent.report("applied", rollout_id="ro-1", generation=1))

    batches = await stored_messages(bus, f"slmops.gateway.reports.v1.{SITE}.>")
    carried = [c.report for b in batches
               for c in reports_in([decode_message(b.subject, b.data or b"")])]  # fmt: skip
    assert [(r.gateway_id, r.kind, r.labels) for r in carried] == [
        ("gw-9", "acknowledged", {"site": SITE})
    ]
    own = await stored_messages(bus, "slmops.gateway.report.v1.*.gw-9")
    sent = [decode_message(m.subject, m.data or b"").data.kind for m in own]
    assert sent == ["registered", "applied"]
