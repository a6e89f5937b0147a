"""How a simulated site hears its gateways' own assignments: the exceptions to their cohorts
(overlays, rollbacks, pinned gateways) and every change for gateways older than cohorts.

A real gateway speaking the cohort protocol hears its own assignment subject as core NATS and
catches up from KV when it reconnects: it costs JetStream no consumer. A site whose simulated
gateways all speak it does the same. A real older gateway has a durable consumer of its own;
a site with older gateways keeps one durable for all of its gateways (``durable``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from slmops.bus import Bus, Handlers
from slmops.bus.consumer import EventConsumer
from slmops.bus.topology import ConsumerSpec, stream_for_subject
from slmops.cohorts import COHORT_COUNT
from slmops.events import (
    CloudEvent,
    GatewayAssignment,
    GatewayReport,
)
from slmops.events.reports import report_event
from slmops.settings import ConsumerSettings
from slmops_gateway.notifications import heard_assignment

#: A gateway acting on its assignment: its report, or None (nothing to say, not one to act).
Apply = Callable[[GatewayAssignment], Awaitable[GatewayReport | None]]
_SUBJECT = f"{GatewayAssignment.event_type}.>"  # gateway ids are one token: no prefix filter
_ATTEMPTS = 5  # tries to act on an assignment heard as core NATS (a durable redelivers)
log = logging.getLogger(__name__)


class SiteAssignments:
    """Listens for the assignments of the gateways in ``ours``; each acts through ``apply``
    and its report goes out through ``publish`` (through the consumer's results, durable)."""

    def __init__(
        self, bus: Bus, site: str, ours: Container[str], apply: Apply,
        publish: Callable[[GatewayReport], Awaitable[None]], durable: bool,
    ) -> None:  # fmt: skip
        self.bus, self.site, self.ours = bus, site, ours
        self._apply, self._publish, self.durable = apply, publish, durable
        self._consumer: EventConsumer | None = None
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if not self.durable:
            self._sub = await self.bus.nc.subscribe(
                _SUBJECT, cb=self._on_message, pending_msgs_limit=10 * COHORT_COUNT
            )
            return
        stream = stream_for_subject(_SUBJECT).name
        spec = ConsumerSpec(stream=stream, durable=self.site, filter_subjects=(_SUBJECT,),
                            ack_wait_s=60.0, max_deliver=5, max_ack_pending=10_000)  # fmt: skip
        await self.bus.js.add_consumer(stream, ConsumerConfig(
            durable_name=self.site, filter_subject=_SUBJECT, ack_wait=60.0, max_deliver=5,
            max_ack_pending=10_000, deliver_policy=DeliverPolicy.NEW,  # the past is in KV
        ))  # fmt: skip
        handlers = Handlers()
        handlers.register(GatewayAssignment, self._on_event, subject=_SUBJECT)
        settings = ConsumerSettings(max_concurrency=1000, fetch_batch=1000)
        self._consumer = EventConsumer(self.bus, spec, handlers, settings)
        await self._consumer.start()

    async def stop(self) -> None:
        """Stop listening, let the gateways acting finish, remove the site's durable."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
            await self.bus.js.delete_consumer(stream_for_subject(_SUBJECT).name, self.site)

    async def _on_event(self, event: CloudEvent[GatewayAssignment]) -> Any:
        if event.data.gateway_id not in self.ours:
            return None
        report = await self._apply(event.data)
        return None if report is None else [report_event(report)]

    async def _on_message(self, msg: Msg) -> None:
        """An assignment heard as it is stored; its gateway acts in the background (again on
        a failure, as a durable would redeliver it)."""
        if msg.subject.rpartition(".")[2] not in self.ours:
            return  # another site's gateway: not even parsed
        if (assignment := heard_assignment(msg)) is not None:
            task = asyncio.create_task(self._act(assignment))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _act(self, assignment: GatewayAssignment) -> None:
        for attempt in range(_ATTEMPTS):  # NATS or the registry away: again, later
            try:
                report = await self._apply(assignment)
                if report is not None:
                    await self._publish(report)
                return
            except Exception as exc:
                log.info("%s: acting on assignment %d failed (%r)", assignment.gateway_id,
                         assignment.generation, exc)  # fmt: skip
            await asyncio.sleep(0.5 * 2**attempt)
