"""A site's wave reports sent as batches: what a fleet costs the platform per gateway.

Each gateway's acknowledgement and outcome is a JetStream message to store, deliver to two
services and acknowledge: a wave to 100,000 gateways is 200,000 of them. Gateways that share
a site (here: the agents of a simulated fleet, one connection; in a deployment, a relay beside
the site's leaf node) can send theirs as :class:`~slmops.events.GatewayReports` batches: one
message per up to ``max_reports`` reports or ``linger_s``, whichever comes first. Each agent
still waits until its own report is stored, so a report is never acknowledged to its gateway
before it is durable; a batch that could not be stored fails every report in it (each agent
acts again and reports in a later batch).
"""

from __future__ import annotations

import asyncio
import uuid

from slmops.bus import Bus
from slmops.events import GatewayReport, GatewayReports, new_event
from slmops.events.payloads import MAX_BATCHED_REPORTS


class SiteReporter:
    def __init__(
        self, bus: Bus, site: str, *, max_reports: int = 1000, linger_s: float = 0.005
    ) -> None:
        if not 1 <= max_reports <= MAX_BATCHED_REPORTS:
            raise ValueError(f"max_reports must be within 1..{MAX_BATCHED_REPORTS}")
        self.bus, self.site = bus, site
        self.max_reports, self.linger_s = max_reports, linger_s
        self.batches_sent = 0
        self._pending: list[tuple[GatewayReport, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def send(self, report: GatewayReport) -> None:
        """Return once the batch carrying ``report`` is stored (or raise why it was not)."""
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        self._pending.append((report, stored))
        if len(self._pending) >= self.max_reports:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger_s, self._flush)
        await stored

    async def close(self) -> None:
        """Send what is pending and wait for every batch under way."""
        self._flush()
        await asyncio.gather(*self._sending, return_exceptions=True)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._publish(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _publish(self, batch: list[tuple[GatewayReport, asyncio.Future[None]]]) -> None:
        try:
            payload = GatewayReports(site=self.site, batch=uuid.uuid4().hex,
                                     reports=[report for report, _ in batch])  # fmt: skip
            await self.bus.publish(new_event(payload, source=f"/slmops/site/{self.site}"))
        except Exception as exc:  # every agent of the batch learns it and acts again
            for _, stored in batch:
                if not stored.done():
                    stored.set_exception(exc)
            return
        self.batches_sent += 1
        for _, stored in batch:
            if not stored.done():
                stored.set_result(None)
