"""A batched consumer loop: pull many, decode all, one handler call, ack all.

For streams of many small events whose effect is a fold (a fleet's health reports into a rolling
view): a handler call and an ack round trip per message would cost more than the fold itself.
Per batch: fetch up to ``fetch_batch`` -> decode each (a bad message is poison: dead-lettered
at once, the rest go on) -> ``handle(events)`` (in-progress acks keep JetStream from
redelivering a slow one) -> ack each message without waiting for a reply. At-least-once: a lost
ack or a crash means redelivery, so the handler's effects must be idempotent (merges keyed by
event id). A failing batch is naked with backoff; a :class:`PermanentError`, or a failure on a
message's last allowed delivery, dead-letters, as :class:`~slmops.bus.consumer.EventConsumer`
does. A :class:`PartlyHandled` naks only the events it names and acks the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from slmops.bus.connection import Bus
from slmops.bus.consumer import UNKNOWN_TYPE, EventObserver, Outcome
from slmops.bus.deadletter import dead_letter_exhausted, dead_letter_msg
from slmops.bus.topology import ConsumerSpec
from slmops.events.envelope import CloudEvent
from slmops.events.errors import EventDecodeError, PartlyHandled, PermanentError
from slmops.events.registry import check_subject, decode_event
from slmops.settings import ConsumerSettings
from slmops.tasks import cancel_and_wait
from slmops.tracing import extract_trace_context

log = logging.getLogger(__name__)
_BATCH_WAIT_S = 0.05  # how long a pull may wait for more once messages are flowing
# After a batch smaller than _FLOWING, the pull following the long poll's first message takes
# what is there (one round trip) instead of lingering _BATCH_WAIT_S for more. A linger held
# every report of a trickle - a wave to 100 gateways - for up to 50 ms (bench.e2e); without
# it at all, a wave to 100,000 came in batches so small that the consumers and nats-server
# spent 40 % more CPU per report (bench.fleet).
_MORE_WAIT_S = 0.005
_FLOWING = 100
_MAX_LINKS = 128  # producer spans a batch span links to (OpenTelemetry's default limit)
BATCH_TYPE = "batch"  # the event type batch timings and failures are observed under

BatchHandler = Callable[[list[CloudEvent[Any]]], Awaitable[None]]
Decoder = Callable[[bytes], CloudEvent[Any]]


@dataclass
class BatchStats:
    batches: int = 0
    handled: int = 0  # messages acked after a successful batch
    retried: int = 0  # messages naked for a later retry
    dead_lettered: int = 0
    last_error: str = ""


class BatchConsumer:
    """Runs one durable pull consumer, one batch at a time, until :meth:`stop`."""

    def __init__(
        self, bus: Bus, spec: ConsumerSpec, handle: BatchHandler, settings: ConsumerSettings,
        observer: EventObserver | None = None, decode: Decoder = decode_event,
    ) -> None:  # fmt: skip
        """``decode`` turns a body into an event or raises :class:`EventDecodeError`; a
        consumer of one event type may pass a faster one than the all-types default."""
        self.bus, self.spec, self.handle, self.settings = bus, spec, handle, settings
        self.observer, self.decode = observer, decode
        self.stats = BatchStats()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._advisories: Subscription | None = None
        self._handling = False  # a batch is being handled: stop() lets it finish

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        self._sub = await self.bus.js.pull_subscribe_bind(
            durable=self.spec.durable, stream=self.spec.stream
        )
        self._advisories = await self.bus.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.spec.stream}.{self.spec.durable}",
            cb=self._on_max_deliveries,
        )
        self._stopping.clear()
        self._loop_task = asyncio.create_task(
            self._run(self._sub), name=f"batch {self.spec.durable}"
        )

    async def stop(self) -> None:
        """Stop pulling; a batch being handled finishes (up to ``drain_timeout_s``)."""
        self._stopping.set()
        task = self._loop_task
        if task is not None:
            if not self._handling:
                task.cancel()  # interrupts a pending fetch (what it pulled is redelivered)
            try:  # the loop checks _stopping after the batch it is handling
                await asyncio.wait_for(asyncio.shield(task), self.settings.drain_timeout_s)
            except TimeoutError:  # unacked messages are redelivered to whoever runs next
                log.warning("%s: drain timed out mid-batch", self.spec.durable)
            except asyncio.CancelledError:
                pass
            await cancel_and_wait(task)  # ended already, or cut short mid-batch
        if not self.bus.nc.is_closed:
            await self.bus.nc.flush()  # the last batch's acks
            for sub in (self._sub, self._advisories):
                if sub is not None:
                    await sub.unsubscribe()
        self._sub = self._advisories = None

    async def _run(self, sub: JetStreamContext.PullSubscription) -> None:
        error_pause_s, drained, batch = 0.1, True, self.settings.fetch_batch
        flowing = False  # the last batch was large: the next may wait to grow as large
        while not self._stopping.is_set():
            # nats-py's fetch(n > 1) on an empty stream lingers until n messages came or the
            # timeout passed: an idle consumer long-polls for one message (returned on
            # arrival) and then asks for what else is there (lingering only in a flow).
            try:
                if drained:
                    msgs = await sub.fetch(1, timeout=self.settings.fetch_timeout_s)
                    wait_s = _BATCH_WAIT_S if flowing else _MORE_WAIT_S
                    msgs += await _fetch_more(sub, batch - 1, wait_s) if batch > 1 else []
                else:
                    msgs = await sub.fetch(batch, timeout=_BATCH_WAIT_S)
            except (nats.errors.TimeoutError, TimeoutError):  # nothing to fetch
                drained = True
                continue
            except (nats.errors.Error, OSError) as exc:  # broker away: reconnect is automatic
                log.info("%s: fetch failed (%r); retrying", self.spec.durable, exc)
                await asyncio.sleep(error_pause_s)
                error_pause_s = min(error_pause_s * 2, 2.0)
                continue
            error_pause_s = 0.1
            drained, flowing = len(msgs) < batch, len(msgs) >= _FLOWING
            self._handling = True
            try:
                await self._process(msgs)
            except Exception as exc:  # never let one batch kill the loop: it is redelivered
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._observe("failed", [UNKNOWN_TYPE] * len(msgs))
                log.exception("%s: could not settle a batch of %d", self.spec.durable, len(msgs))
            finally:
                self._handling = False

    async def _process(self, msgs: list[Msg]) -> None:
        events: list[CloudEvent[Any]] = []
        decoded: list[Msg] = []
        with _collector_paused():
            for msg in msgs:
                try:
                    events.append(check_subject(self.decode(msg.data), msg.subject))
                    decoded.append(msg)
                except EventDecodeError as exc:
                    await self._dead_letter([msg], str(exc), exc, [UNKNOWN_TYPE])
            if not events:
                return
            loop = asyncio.get_running_loop()
            began = loop.time()
            heartbeat = asyncio.create_task(self._keep_in_progress(decoded))
            try:
                with self._batch_span(decoded, events):
                    await self.handle(events)
            except PermanentError as exc:
                await self._dead_letter(decoded, str(exc), exc, [e.type for e in events])
                return
            except PartlyHandled as exc:  # the named ones again later, the rest is done
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.info("%s: %d of a batch of %d again later: %s", self.spec.durable,
                         len(exc.event_ids), len(events), exc)  # fmt: skip
                again = [e.id in exc.event_ids for e in events]
                await self._retry_or_dead_letter(
                    [m for m, a in zip(decoded, again, strict=True) if a],
                    [e for e, a in zip(events, again, strict=True) if a], exc,
                )  # fmt: skip
                decoded = [m for m, a in zip(decoded, again, strict=True) if not a]
                events = [e for e, a in zip(events, again, strict=True) if not a]
            except Exception as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: batch of %d failed: %r", self.spec.durable, len(events), exc)
                await self._retry_or_dead_letter(decoded, events, exc)
                return
            finally:
                heartbeat.cancel()
                if self.observer is not None:
                    self.observer.time(BATCH_TYPE, loop.time() - began)
        for msg in decoded:  # a publish to the ack subject each, no reply awaited
            await msg.ack()
        self.stats.batches += 1
        self.stats.handled += len(decoded)
        self._observe("handled", [e.type for e in events])

    def _batch_span(self, msgs: list[Msg], events: list[CloudEvent[Any]]) -> Any:
        """One consumer span per batch: the child of its first message's producer span (it
        joins that journey's trace) and linked to up to ``_MAX_LINKS`` more of them, as
        OpenTelemetry's messaging conventions do for batch receives."""
        contexts = []
        for msg in msgs:  # only as many as the span uses: parsing 5,000 headers is not free
            if (context := extract_trace_context(msg.headers)) is not None:
                contexts.append(context)
                if len(contexts) > _MAX_LINKS:
                    break
        links = [Link(trace.get_current_span(c).get_span_context()) for c in contexts[1:]]
        return self.bus.tracer.start_as_current_span(
            f"process {events[0].type}", context=contexts[0] if contexts else None,
            kind=SpanKind.CONSUMER, links=links,
            attributes={"messaging.batch.message_count": len(events),
                        "messaging.consumer.group.name": self.spec.durable},
        )  # fmt: skip

    async def _retry_or_dead_letter(
        self, msgs: list[Msg], events: list[CloudEvent[Any]], exc: Exception
    ) -> None:
        last: list[tuple[Msg, str]] = []
        again: list[str] = []
        for msg, event in zip(msgs, events, strict=True):
            num_delivered = msg.metadata.num_delivered  # parses the subject: a failure is rare
            if num_delivered >= self.spec.max_deliver:
                last.append((msg, event.type))
                continue
            await msg.nak(delay=self._backoff_s(num_delivered))
            again.append(event.type)
        if last:
            reason = f"failed on all {self.spec.max_deliver} deliveries; last error: {exc}"
            await self._dead_letter([m for m, _ in last], reason, exc, [t for _, t in last])
        self.stats.retried += len(again)
        self._observe("retried", again)

    async def _dead_letter(
        self, msgs: list[Msg], reason: str, exc: Exception, event_types: list[str]
    ) -> None:
        for msg in msgs:
            await dead_letter_msg(self.bus, msg, consumer=self.spec.durable, reason=reason,
                                  error_type=type(exc).__name__)  # fmt: skip
        self.stats.dead_lettered += len(msgs)
        self._observe("dead_lettered", event_types)

    def _observe(self, outcome: Outcome, event_types: list[str]) -> None:
        if self.observer is not None:
            for event_type in event_types:
                self.observer.count(self.spec.durable, event_type, outcome)

    def _backoff_s(self, num_delivered: int) -> float:
        base, cap = self.settings.nak_backoff_base_s, self.settings.nak_backoff_max_s
        delay = min(cap, base * 2.0 ** (num_delivered - 1))
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto

    async def _keep_in_progress(self, msgs: list[Msg]) -> None:
        """A slow batch tells JetStream it is still being worked on, well before ack_wait."""
        interval_s = max(0.05, self.spec.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval_s)
            for msg in msgs:
                try:
                    await msg.in_progress()
                except nats.errors.Error as exc:
                    log.debug("in-progress ack failed: %s", exc)

    async def _on_max_deliveries(self, advisory_msg: Msg) -> None:
        try:
            advisory: dict[str, Any] = json.loads(advisory_msg.data)
            await dead_letter_exhausted(self.bus, advisory, self.spec.durable)
            self.stats.dead_lettered += 1
            self._observe("dead_lettered", [UNKNOWN_TYPE])
        except Exception:
            log.exception("%s: could not dead-letter an exhausted message", self.spec.durable)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector rests while a batch is decoded and handled.

    Decoding allocates some twenty objects per event and none is garbage while the batch is
    handled: with the collector on, thousands of them set off collections that walk the whole
    heap again and again (measured: a third of the cost of a batch). Reference counting still
    frees what is not in a cycle; the collector runs again when the batch is done. Nested
    pauses (two consumers in one process) resume it only when the outer one ends.
    """
    global _pauses
    if _pauses == 0 and not gc.isenabled():  # disabled by the application: leave it so
        yield
        return
    _pauses += 1
    gc.disable()
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0:
            gc.enable()


_pauses = 0


async def _fetch_more(sub: JetStreamContext.PullSubscription, n: int, wait_s: float) -> list[Msg]:
    try:
        return await sub.fetch(n, timeout=wait_s)
    except (nats.errors.TimeoutError, TimeoutError):
        return []
