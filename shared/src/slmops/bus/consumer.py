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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry.trace import SpanKind, Status, StatusCode

from slmops.bus.connection import Bus
from slmops.bus.deadletter import dead_letter_exhausted, dead_letter_msg
from slmops.bus.handlers import Handlers, durable_name
from slmops.bus.topology import ConsumerSpec
from slmops.events.errors import EventDecodeError, PermanentError
from slmops.events.registry import decode_message
from slmops.settings import ConsumerSettings
from slmops.tasks import cancel_and_wait
from slmops.tracing import extract_trace_context

log = logging.getLogger(__name__)
#: Acked stream sequences remembered per consumer: covers the acks a NATS leader election can
#: lose (those in flight when a node dies), at a few hundred kB.
_ACKED_REMEMBERED = 10_000
_BATCH_WAIT_S = 0.05  # how long a batch pull may wait for more once messages are flowing
#: What became of one message: acked after its handler (handled), acked without one (ignored),
#: naked for a later retry, dead-lettered, or not settled at all (failed: redelivered later).
Outcome = Literal["handled", "ignored", "retried", "dead_lettered", "failed"]
UNKNOWN_TYPE = "unknown"  # undecodable, or dead-lettered by an advisory that names no type


class EventObserver(Protocol):
    """Told what became of each message (the service's metrics)."""

    def count(self, consumer: str, event_type: str, outcome: str) -> None: ...

    def time(self, event_type: str, duration_s: float) -> None:
        """A handler's run, its output events published, whatever its outcome."""


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
        self, bus: Bus, spec: ConsumerSpec, handlers: Handlers, settings: ConsumerSettings,
        observer: EventObserver | None = None, service: str | None = None,
    ) -> None:  # fmt: skip
        """``observer`` is told every outcome under the consumer's ``label``: the durable
        name of ``service`` on the stream (a gateway's consumer without its id in it)."""
        self.bus = bus
        self.spec = spec
        self.handlers = handlers
        self.settings = settings
        self.stats = ConsumerStats()
        self.observer = observer
        self.label = durable_name(service, spec.stream) if service else spec.durable
        # A fixed pool of workers takes fetched messages from a queue: the pool size is the
        # concurrency bound, and no task is created per message.
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._busy = 0
        self._workers: list[asyncio.Task[None]] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        # id(msg) -> (msg, start time) of running handlers, for in-progress acks (Msg is unhashable)
        self._running_since: dict[int, tuple[Msg, float]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._span_attributes = {
            "messaging.system": "nats",
            "messaging.consumer.group.name": spec.durable,
        }
        self._advisories: Subscription | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        # stream sequences this process acked lately: a redelivery of one is a lost ack
        self._acked: OrderedDict[int, None] = OrderedDict()

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
        self._workers = [
            asyncio.create_task(self._work(), name=f"{self.spec.durable} worker {i}")
            for i in range(self.settings.max_concurrency)
        ]
        self._loop_task = asyncio.create_task(self._run(sub), name=f"consume {self.spec.durable}")
        self._heartbeat = asyncio.create_task(self._keep_in_progress())

    async def stop(self) -> None:
        """Stop pulling, let running handlers finish (up to ``drain_timeout_s``)."""
        self._stopping.set()
        if self._loop_task is not None:  # interrupts a pending fetch; fetched msgs are queued
            await cancel_and_wait(self._loop_task)
        try:  # queued and running messages are handled and acked
            await asyncio.wait_for(self._queue.join(), self.settings.drain_timeout_s)
        except TimeoutError:  # the rest is not acked: JetStream redelivers it elsewhere
            log.warning("%s: drain timed out with %d message(s) unfinished",
                        self.spec.durable, self._busy + self._queue.qsize())  # fmt: skip
        await cancel_and_wait(*(t for t in (*self._workers, self._heartbeat) if t is not None))
        if not self.bus.nc.is_closed:
            await self.bus.nc.flush()  # the acks of the handlers that just finished
            for sub in (self._sub, self._advisories):
                if sub is not None:
                    await sub.unsubscribe()
        self._sub = self._advisories = None

    async def _run(self, sub: JetStreamContext.PullSubscription) -> None:
        settings, error_pause_s, drained = self.settings, 0.1, True
        while not self._stopping.is_set():
            free = settings.max_concurrency - self._busy - self._queue.qsize()
            # Pull again once a quarter of the workers are free: a pull per message would cost
            # a round trip each.
            if free < max(1, settings.max_concurrency // 4):
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            # nats-py's fetch(n > 1) on an empty stream lingers until n messages came or the
            # timeout passed: a burst's tail or a lone event would wait up to fetch_timeout_s.
            # So an idle consumer long-polls for one message (returned on arrival), and a busy
            # one asks for a batch that returns at once with what is there.
            want = 1 if drained else min(free, settings.fetch_batch)
            timeout_s = settings.fetch_timeout_s if drained else _BATCH_WAIT_S
            try:
                msgs = await sub.fetch(want, timeout=timeout_s)
            except (nats.errors.TimeoutError, TimeoutError):  # nothing to fetch (nats-py
                drained = True  # raises either, depending on where the pull timed out)
                continue
            except (nats.errors.Error, OSError) as exc:  # broker away: reconnect is automatic
                log.info("%s: fetch failed (%r); retrying", self.spec.durable, exc)
                await asyncio.sleep(error_pause_s)
                error_pause_s = min(error_pause_s * 2, 2.0)
                continue
            error_pause_s = 0.1
            drained = len(msgs) < want
            for msg in msgs:
                self._queue.put_nowait(msg)

    async def _work(self) -> None:
        while True:
            msg = await self._queue.get()
            self._busy += 1
            try:
                await self._process(msg)
            finally:
                self._busy -= 1
                self._queue.task_done()
                self._slot_freed.set()

    async def _process(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except Exception as exc:  # never let one message kill the loop; it will be redelivered
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self._observe(UNKNOWN_TYPE, "failed")
            log.exception("%s: could not settle message on %s", self.spec.durable, msg.subject)

    async def _handle(self, msg: Msg) -> None:
        try:
            event = decode_message(msg.subject, msg.data)
        except EventDecodeError as exc:
            await self._dead_letter(msg, str(exc), exc, UNKNOWN_TYPE)
            return
        handler = self.handlers.get(event.type)
        if handler is None:  # a known type this service does not handle: not an error
            self.stats.ignored += 1
            await msg.ack()
            self._observe(event.type, "ignored")
            return
        parent = extract_trace_context(msg.headers) or extract_trace_context(
            {"traceparent": event.traceparent, "tracestate": event.tracestate or ""}
            if event.traceparent
            else None
        )
        num_delivered = _delivery_count(msg)
        if num_delivered > 1 and _stream_sequence(msg) in self._acked:
            # handled and acked here already; the ack was lost (a NATS cluster node died or
            # a stream leader changed before it was replicated): settle it, do not redo it
            await msg.ack()
            self.stats.ignored += 1
            self._observe(event.type, "ignored")
            return
        with self.bus.tracer.start_as_current_span(
            f"process {event.type}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={"messaging.message.id": event.id, **self._span_attributes},
        ) as span:
            if num_delivered > 1:
                span.set_attribute("messaging.delivery_count", num_delivered)
            began = asyncio.get_running_loop().time()
            self._running_since[id(msg)] = (msg, began)
            try:
                outputs = await handler(event)
                for output in outputs or ():
                    await self.bus.publish(output)
            except PermanentError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self._time(event.type, began)
                await self._dead_letter(msg, str(exc), exc, event.type)
                return
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._time(event.type, began)
                await self._retry_or_dead_letter(msg, exc, num_delivered, event.type)
                return
            finally:
                del self._running_since[id(msg)]
            self._time(event.type, began)
            await msg.ack()
            self._remember_acked(msg)
            self.stats.handled += 1
            self._observe(event.type, "handled")

    async def _retry_or_dead_letter(
        self, msg: Msg, exc: Exception, num_delivered: int, event_type: str
    ) -> None:
        if num_delivered >= self.spec.max_deliver:
            reason = f"failed on all {num_delivered} deliveries; last error: {exc}"
            await self._dead_letter(msg, reason, exc, event_type)
            return
        self.stats.retried += 1
        await msg.nak(delay=self._backoff_s(num_delivered))
        self._observe(event_type, "retried")

    async def _dead_letter(self, msg: Msg, reason: str, exc: Exception, event_type: str) -> None:
        await dead_letter_msg(
            self.bus, msg, consumer=self.spec.durable, reason=reason, error_type=type(exc).__name__
        )
        self.stats.dead_lettered += 1
        self._observe(event_type, "dead_lettered")

    def _remember_acked(self, msg: Msg) -> None:
        self._acked[_stream_sequence(msg)] = None
        if len(self._acked) > _ACKED_REMEMBERED:
            self._acked.popitem(last=False)

    def _observe(self, event_type: str, outcome: Outcome) -> None:
        if self.observer is not None:
            self.observer.count(self.label, event_type, outcome)

    def _time(self, event_type: str, began: float) -> None:
        if self.observer is not None:
            self.observer.time(event_type, asyncio.get_running_loop().time() - began)

    def _backoff_s(self, num_delivered: int) -> float:
        base, cap = self.settings.nak_backoff_base_s, self.settings.nak_backoff_max_s
        delay = min(cap, base * 2.0 ** (num_delivered - 1))
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto

    async def _keep_in_progress(self) -> None:
        """Tell JetStream that long handlers are still working, well before ``ack_wait`` ends.

        One sweeper per consumer rather than a timer per message: most handlers finish long
        before the first beat, and arming and cancelling a timer for each costs throughput.
        """
        interval_s = max(0.05, self.spec.ack_wait_s / 3)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s / 2)
            now = loop.time()
            long_running = [m for m, t in self._running_since.values() if now - t >= interval_s]
            for msg in long_running:
                try:
                    await msg.in_progress()
                except nats.errors.Error as exc:
                    log.debug("in-progress ack failed: %s", exc)

    async def _on_max_deliveries(self, advisory_msg: Msg) -> None:
        try:
            advisory: dict[str, Any] = json.loads(advisory_msg.data)
            await dead_letter_exhausted(self.bus, advisory, self.spec.durable)
            self.stats.dead_lettered += 1
            self._observe(UNKNOWN_TYPE, "dead_lettered")
        except Exception:
            log.exception("%s: could not dead-letter an exhausted message", self.spec.durable)


def _stream_sequence(msg: Msg) -> int:
    """The stream sequence of ``msg``, from its ack subject (see :func:`_delivery_count`)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5])
    if len(tokens) >= 12:
        return int(tokens[7])
    return msg.metadata.sequence.stream


def _delivery_count(msg: Msg) -> int:
    """How often JetStream has delivered ``msg``, from its ack subject.

    ``msg.metadata`` parses the whole subject and builds a datetime; this is on every message,
    and only the count is needed (``$JS.ACK.<stream>.<consumer>.<delivered>...`` in the v1
    form, two more tokens - domain and account hash - before the stream in v2).
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[4])
    if len(tokens) >= 12:
        return int(tokens[6])
    return msg.metadata.num_delivered  # unknown form: let nats-py parse (or reject) it
