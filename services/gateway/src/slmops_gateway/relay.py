"""A site's relay: its gateways' wave reports carried to the platform as the site's batches.

Each wave report a gateway stores itself is a JetStream message the platform stores, delivers
to two services and acknowledges: that, not NATS, is what a wave to a large fleet costs
(``bench/README.md``). The relay runs beside the site's leaf node with the site's own identity
(``slmops auth enroll-site``). A gateway enrolled at the site asks it, by a core NATS request
on a subject only that gateway may publish to (``relay_subject``), to carry a report; the relay
checks that the report is the sender's own, a wave report and of its site, adds it to the
site's next :class:`~slmops_gateway.sitereports.SiteReporter` batch and answers once that batch
is stored - so a gateway is never told its report is safe before it is.

A gateway that gets no answer (no relay running, a relay that died, a batch that was not
stored) publishes the report itself, as gateways without a site do: the relay makes reports
cheaper, never less certain. The services take a site's batch only for gateways that declared
that site themselves (``slmops.events.reports.may_carry``), so a relay taken over can speak
only for its own site's gateways, and only about their waves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import Annotated

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops.bus import Bus
from slmops.bus.credentials import NatsCredentials
from slmops.bus.permissions import SITE_RELAY_SUBJECT, relay_subject
from slmops.events import GatewayReport
from slmops.events.payloads import BATCHED_REPORT_KINDS, MAX_BATCHED_REPORTS
from slmops.events.reports import SITE_LABEL
from slmops.settings import PlatformSettings
from slmops_gateway.sitereports import SiteReporter

log = logging.getLogger(__name__)
SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")]
_QUEUE = "relay"  # several relays of one site share its gateways' requests


class NotCarried(Exception):
    """A request the relay refuses: the gateway's report is not one it may carry."""


class SiteRelay:
    """Answers its site's gateways' requests on a NATS connection with the site's identity."""

    def __init__(self, nc: Client, reporter: SiteReporter) -> None:
        self.nc, self.reporter = nc, reporter
        self.site = reporter.site
        self.carried = self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        subject = f"{SITE_RELAY_SUBJECT}.{self.site}.report.*"
        self._subscription = await self.nc.subscribe(subject, queue=_QUEUE, cb=self._on_request)
        # started = reachable: without the flush the server may not have the interest yet, and
        # a gateway's request right after would hear "no responders"
        await self.nc.flush()

    async def stop(self) -> None:
        """Stop hearing requests; carry and answer those already heard."""
        if self._subscription is None:
            return
        subscription, self._subscription = self._subscription, None
        await subscription.unsubscribe()
        await self.reporter.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        # nats-py calls a subscription's callback one message after another: each request
        # waits for its batch in a task of its own, or the batch would never fill
        task = asyncio.create_task(self._carry(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _carry(self, msg: Msg) -> None:
        try:
            await self.reporter.send(self.accepted(msg.subject, msg.data))
        except NotCarried as exc:
            self.refused += 1
            await msg.respond(json.dumps({"refused": str(exc)}).encode())
        except Exception as exc:  # the batch was not stored: the gateway publishes it itself
            await msg.respond(json.dumps({"error": f"not stored: {exc}"}).encode())
        else:
            self.carried += 1
            await msg.respond(b'{"stored":true}')

    def accepted(self, subject: str, data: bytes) -> GatewayReport:
        """The report of a request, if the relay may carry it (:class:`NotCarried` if not)."""
        sender = subject.rsplit(".", 1)[-1]  # the subject only that gateway may publish to
        try:
            report = GatewayReport.model_validate_json(data)
        except ValidationError as exc:
            raise NotCarried(f"not a gateway report: {exc.error_count()} error(s)") from None
        if report.gateway_id != sender:
            raise NotCarried(f"a report of {report.gateway_id} sent by {sender}")
        if report.kind not in BATCHED_REPORT_KINDS:
            raise NotCarried(f"{report.kind} reports are not carried by a site")
        if report.labels.get(SITE_LABEL) != self.site:
            raise NotCarried(f"its labels do not name site {self.site}")
        return report


async def send_via_relay(
    nc: Client, site: str, report: GatewayReport, timeout_s: float
) -> str | None:
    """Have ``site``'s relay carry ``report``: None once it is stored, else why not (then the
    gateway publishes it itself)."""
    try:
        reply = await nc.request(relay_subject(site, report.gateway_id),
                                 report.model_dump_json().encode(), timeout=timeout_s)  # fmt: skip
    except NoRespondersError:
        return f"no relay of site {site} is running"
    except NatsTimeoutError:
        return f"site {site}'s relay did not answer within {timeout_s:g}s"
    try:
        answer = json.loads(reply.data)
    except ValueError:
        return "the relay's answer is not JSON"
    if answer.get("stored") is True:
        return None
    return str(answer.get("refused") or answer.get("error") or "the relay did not store it")


class RelaySettings(BaseSettings):
    """A site relay: env prefix ``SLMOPS_RELAY_`` (NATS from ``SLMOPS_NATS_*``)."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_RELAY_", extra="ignore")

    site: SiteName = Field(description="The site whose gateways it carries reports for.")
    max_reports: int = Field(
        1000, ge=1, le=MAX_BATCHED_REPORTS, description="Reports per batch at most."
    )
    linger_s: float = Field(
        0.005, gt=0, le=1.0, description="How long a report waits for batch-mates, in seconds."
    )


async def run(settings: RelaySettings, platform: PlatformSettings) -> None:
    """Carry the site's reports until SIGTERM or SIGINT; then answer what was heard."""
    credentials = NatsCredentials.from_settings(platform, f"site-{settings.site}")
    bus = await Bus.connect(platform.nats_url, source=f"/slmops/site/{settings.site}",
                            credentials=credentials)  # fmt: skip
    reporter = SiteReporter(bus, settings.site, max_reports=settings.max_reports,
                            linger_s=settings.linger_s)  # fmt: skip
    relay = SiteRelay(bus.nc, reporter)
    await relay.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("relay of site %s: carrying its gateways' wave reports", settings.site)
    await stopping.wait()
    await relay.stop()
    await bus.close()
    log.info("relay of site %s: stopped (%d carried, %d refused)", settings.site,
             relay.carried, relay.refused)  # fmt: skip


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = RelaySettings()
    except ValidationError as exc:
        raise SystemExit(f"relay settings: {exc}") from None
    asyncio.run(run(settings, PlatformSettings()))


if __name__ == "__main__":
    main()
