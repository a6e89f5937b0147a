"""Attacks through a site's relay (the local stack's nats-server permissions). A gateway asks
only its own site's relay and only as itself; a relay hears only its own site's gateways and
publishes only its own site's batches - no gateway's own reports, no other site's batches,
nothing of a service. (What a relay taken over may write into its own batches the services
check: ``tests/pipeline/test_cohort_rollouts.py``.)"""

from __future__ import annotations

from typing import Any

from slmops.bus import Bus
from slmops.bus.permissions import REPORT_SUBJECT, REPORTS_SUBJECT, relay_subject
from slmops.events import GatewayReport
from slmops.stack.identities import enroll_gateway, enroll_site
from slmops.testing.attacks import connect_once_enrolled, local_user
from slmops.testing.localstack import RunningStack
from slmops_gateway.relay import SiteRelay, send_via_relay
from slmops_gateway.sitereports import SiteReporter


def _report(gateway_id: str, site: str) -> GatewayReport:
    return GatewayReport(gateway_id=gateway_id, kind="acknowledged", device_class="x86-avx2",
                         labels={"site": site}, rollout_id="ro-1", generation=1)  # fmt: skip


async def test_a_sites_gateways_and_relay_stay_within_the_site(
    stack: RunningStack, connect: Any
) -> None:
    enroll_site(stack.var_dir, "berlin")
    enroll_gateway(stack.var_dir, "gw-berlin", "x86-avx2", site="berlin")
    enroll_gateway(stack.var_dir, "gw-paris", "x86-avx2", site="paris")
    berlin = await connect_once_enrolled(connect, local_user(stack.var_dir, "gateway-gw-berlin"))
    paris = await connect_once_enrolled(connect, local_user(stack.var_dir, "gateway-gw-paris"))
    relay_user = local_user(stack.var_dir, "site-berlin")
    relay_conn = await connect_once_enrolled(connect, relay_user)
    bus = await Bus.connect(stack.urls["nats"], source="/slmops/site/berlin",
                            credentials=relay_user)  # fmt: skip
    relay = SiteRelay(bus.nc, SiteReporter(bus, "berlin"))
    await relay.start()
    try:
        # the gateway's own report, through its own site's relay: carried and stored
        assert await send_via_relay(berlin.client, "berlin", _report("gw-berlin", "berlin"),
                                    10.0) is None  # fmt: skip
        assert relay.carried == 1

        # a gateway asks only as itself, and only its own site's relay
        for who, subject in ((berlin, relay_subject("berlin", "gw-paris")),
                             (berlin, relay_subject("paris", "gw-berlin")),
                             (paris, relay_subject("berlin", "gw-paris"))):  # fmt: skip
            error = await who.refused(who.client.publish(subject, b"{}"))
            assert f'publish to "{subject.lower()}"' in error

        # the relay publishes only its own site's batches, and hears only its own site
        forbidden = (
            f"{REPORTS_SUBJECT}.paris.b1",
            f"{REPORT_SUBJECT}.applied.gw-berlin",
            "slmops.rollout.v1.started.x",
            "$KV.slmops-desired-state.gw-berlin",
        )
        for subject in forbidden:
            error = await relay_conn.refused(relay_conn.client.publish(subject, b"{}"))
            assert f'publish to "{subject.lower()}"' in error
        heard = "slmops.site.v1.paris.report.*"
        error = await relay_conn.refused(relay_conn.client.subscribe(heard))
        assert f'subscription to "{heard}"' in error
    finally:
        await relay.stop()
        await bus.close()
