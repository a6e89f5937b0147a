"""The consumer loop: pull, decode, run handlers with bounded concurrency, ack after effects.

Per message: decode (a bad message is poison: dead-lettered at once) -> handler (in-progress
acks keep JetStream from redelivering a long one) -> publish the handler's events -> ack.
A transient failure naks with exponential backoff; a :class:`PermanentError`, or a failure on
the last allowed delivery, dead-letters. Nothing is acked before its effects are durable, so a
crash at any point means redelivery, and deterministic ids make the redo harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from slmops.bus.connection import Bus
from slmops.bus.deadletter import dead_letter_exhausted, dead_letter_msg
from slmops.bus.handlers import Handlers
from slmops.bus.topology import ConsumerSpec
from slmops.events.envelope import decode_envelope, validate_event
from slmops.events.errors import EventDecodeError, PermanentError
from slmops.events.registry import payload_type
from slmops.settings import ConsumerSettings
from slmops.tracing import extract_trace_context

log = logging.getLogger(__name__)


@dataclass
class ConsumerStats:
    handled: int = 0
    ignored: int = 0
    retried: int = 0
    dead_lettered: int = 0
    last_error: str = ""


class EventConsumer:
    """Runs one durable pull consumer of one service until :meth:`stop`."""

    def __init__(
        self, bus: Bus, spec: ConsumerSpec, handlers: Handlers, settings: ConsumerSettings
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.handlers = handlers
        self.settings = settings
        self.stats = ConsumerStats()
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._advisories: Subscription | None = None
        self._sub: JetStreamContext.PullSubscription | None = None

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        self._sub = sub = await self.bus.js.pull_subscribe_bind(
            durable=self.spec.durable, stream=self.spec.stream
        )
        self._advisories = await self.bus.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.spec.stream}.{self.spec.durable}",
            cb=self._on_max_deliveries,
        )
        self._loop_task = asyncio.create_task(self._run(sub), name=f"consume {self.spec.durable}")

    async def stop(self) -> None:
        """Stop pulling, let running handlers finish (up to ``drain_timeout_s``)."""
        self._stopping.set()
        if self._loop_task is not None:
            self._loop_task.cancel()  # interrupts a pending fetch; fetched msgs are all tasks
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=self.settings.drain_timeout_s)
            for task in pending:  # not acked: JetStream redelivers them elsewhere
                task.cancel()
        if not self.bus.nc.is_closed:
            for sub in (self._sub, self._advisories):
                if sub is not None:
                    await sub.unsubscribe()
        self._sub = self._advisories = None

    async def _run(self, sub: JetStreamContext.PullSubscription) -> None:
        settings, error_pause_s = self.settings, 0.1
        while not self._stopping.is_set():
            free = settings.max_concurrency - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await sub.fetch(
                    min(free, settings.fetch_batch), timeout=settings.fetch_timeout_s
                )
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, OSError) as exc:  # broker away: reconnect is automatic
                log.info("%s: fetch failed (%s); retrying", self.spec.durable, exc)
                await asyncio.sleep(error_pause_s)
                error_pause_s = min(error_pause_s * 2, 2.0)
                continue
            error_pause_s = 0.1
            for msg in msgs:
                task = asyncio.create_task(self._process(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _process(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except Exception as exc:  # never let one message kill the loop; it will be redelivered
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: could not settle message on %s", self.spec.durable, msg.subject)

    async def _handle(self, msg: Msg) -> None:
        try:
            envelope = decode_envelope(msg.data)
            event = validate_event(envelope, payload_type(str(envelope["type"])))
        except EventDecodeError as exc:
            self.stats.dead_lettered += 1
            await dead_letter_msg(
                self.bus, msg, consumer=self.spec.durable, reason=str(exc),
                error_type=type(exc).__name__,
            )  # fmt: skip
            return
        handler = self.handlers.get(event.type)
        if handler is None:  # a known type this service does not handle: not an error
            self.stats.ignored += 1
            await msg.ack()
            return
        parent = extract_trace_context(msg.headers)
        if not trace.get_current_span(parent).get_span_context().is_valid and event.traceparent:
            parent = extract_trace_context({"traceparent": event.traceparent})
        num_delivered = msg.metadata.num_delivered
        with self.bus.tracer.start_as_current_span(
            f"process {event.type}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.consumer.group.name": self.spec.durable,
                "messaging.message.id": event.id,
                "messaging.delivery_count": num_delivered,
            },
        ) as span:
            heartbeat = asyncio.create_task(self._keep_in_progress(msg))
            try:
                outputs = await handler(event)
                for output in outputs or ():
                    await self.bus.publish(output)
            except PermanentError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self.stats.dead_lettered += 1
                await dead_letter_msg(
                    self.bus, msg, consumer=self.spec.durable, reason=str(exc),
                    error_type=type(exc).__name__,
                )  # fmt: skip
                return
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                await self._retry_or_dead_letter(msg, exc, num_delivered)
                return
            finally:
                heartbeat.cancel()
            # ack_sync: the server confirms, so a drained consumer leaves nothing pending
            await msg.ack_sync(timeout=self.bus.request_timeout_s)
            self.stats.handled += 1

    async def _retry_or_dead_letter(self, msg: Msg, exc: Exception, num_delivered: int) -> None:
        if num_delivered >= self.spec.max_deliver:
            self.stats.dead_lettered += 1
            await dead_letter_msg(
                self.bus,
                msg,
                consumer=self.spec.durable,
                reason=f"failed on all {num_delivered} deliveries; last error: {exc}",
                error_type=type(exc).__name__,
            )
            return
        self.stats.retried += 1
        await msg.nak(delay=self._backoff_s(num_delivered))

    def _backoff_s(self, num_delivered: int) -> float:
        base, cap = self.settings.nak_backoff_base_s, self.settings.nak_backoff_max_s
        delay = min(cap, base * 2.0 ** (num_delivered - 1))
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto

    async def _keep_in_progress(self, msg: Msg) -> None:
        """Tell JetStream the handler is still working, well before ``ack_wait`` runs out."""
        interval_s = max(0.05, self.spec.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await msg.in_progress()
            except nats.errors.Error as exc:
                log.debug("in-progress ack failed: %s", exc)

    async def _on_max_deliveries(self, advisory_msg: Msg) -> None:
        try:
            advisory: dict[str, Any] = json.loads(advisory_msg.data)
            await dead_letter_exhausted(self.bus, advisory, self.spec.durable)
            self.stats.dead_lettered += 1
        except Exception:
            log.exception("%s: could not dead-letter an exhausted message", self.spec.durable)
