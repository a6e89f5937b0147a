"""BatchConsumer on a real broker: a batch is handled once and acked, a failed batch is
retried (a partly handled one only in the part it names), poison and exhausted messages are
dead-lettered with the reason."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from slmops.bus import FLEET, BatchConsumer, Bus, ConsumerSpec
from slmops.events import (
    CloudEvent,
    DeadLetter,
    GatewayReport,
    HealthAggregate,
    PartlyHandled,
    PermanentError,
    TransientError,
)
from slmops.events.envelope import new_event
from slmops.testing.consumers import fast_consumer_settings
from slmops.testing.events import await_events
from slmops.testing.polling import until, until_answered

pytestmark = pytest.mark.integration

Handle = Callable[[list[CloudEvent[Any]]], Awaitable[None]]
StartBatches = Callable[..., Awaitable[BatchConsumer]]


def report(i: int) -> CloudEvent[GatewayReport]:
    health = HealthAggregate(window_s=30.0, request_count=10, error_rate=0.0)
    payload = GatewayReport(gateway_id=f"gw-{i}", kind="health", device_class="x86",
                            variant_id="v-1", health=health)  # fmt: skip
    return new_event(payload, source="/test")


@pytest.fixture
async def start_batches(bus: Bus) -> AsyncIterator[StartBatches]:
    started: list[BatchConsumer] = []

    async def start(
        handle: Handle, *, max_deliver: int = 5, ack_wait_s: float = 5.0
    ) -> BatchConsumer:
        spec = ConsumerSpec(FLEET.name, "test-batches", ("slmops.gateway.report.>",),
                            ack_wait_s=ack_wait_s, max_deliver=max_deliver)  # fmt: skip
        await bus.declare_consumer(spec)
        settings = fast_consumer_settings(fetch_batch=1000, max_deliver=max_deliver)
        consumer = BatchConsumer(bus, spec, handle, settings)
        await consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        await consumer.stop()


async def all_acked(bus: Bus, count: int) -> bool:
    info = await bus.js.consumer_info(FLEET.name, "test-batches")
    return info.ack_floor.stream_seq >= count and info.num_ack_pending == 0


async def test_a_batch_is_handled_in_one_call_and_every_message_acked(
    bus: Bus, start_batches: StartBatches
) -> None:
    events = [report(i) for i in range(200)]
    for event in events:
        await bus.publish(event)
    calls: list[list[str]] = []

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        calls.append([e.id for e in batch])

    consumer = await start_batches(handle)
    await until(lambda: consumer.stats.handled == 200, "200 reports handled")
    await until_answered(lambda: all_acked(bus, 200), "every report acked")

    assert [i for call in calls for i in call] == [e.id for e in events]  # once each, in order
    assert len(calls) <= 2  # the long poll's one message, then everything that was there
    assert consumer.stats.batches == len(calls)
    assert consumer.stats.retried == 0


async def test_a_failed_batch_is_retried_then_acked(bus: Bus, start_batches: StartBatches) -> None:
    events = [report(i) for i in range(20)]
    for event in events:
        await bus.publish(event)
    seen: list[str] = []
    failures = 0

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise TransientError("the view's store is away")
        seen.extend(e.id for e in batch)

    consumer = await start_batches(handle)
    await until(lambda: len(set(seen)) == 20, "every report handled after the retry")
    await until_answered(lambda: all_acked(bus, 20), "every report acked")

    assert consumer.stats.retried >= 1
    assert consumer.stats.dead_lettered == 0
    assert "store is away" in consumer.stats.last_error


async def test_a_partly_handled_batch_retries_only_the_events_it_names(
    bus: Bus, start_batches: StartBatches
) -> None:
    # setup: 20 reports; the handler cannot place two of them the first time it sees them
    events = [report(i) for i in range(20)]
    for event in events:
        await bus.publish(event)
    later = {events[3].id, events[17].id}
    calls: list[list[str]] = []
    refused: set[str] = set()

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        calls.append([e.id for e in batch])
        not_yet = (later & set(calls[-1])) - refused  # each refused the first time only
        refused.update(not_yet)
        if not_yet:
            raise PartlyHandled(f"{len(not_yet)} name a rollout not known yet", not_yet)

    # execute
    consumer = await start_batches(handle)
    await until_answered(lambda: all_acked(bus, 20), "every report acked")

    # assert: the others were handled once, only the two named came again
    seen = Counter(i for call in calls for i in call)
    assert {i: n for i, n in seen.items() if n > 1} == dict.fromkeys(later, 2)
    assert set(seen) == {e.id for e in events}
    assert consumer.stats.retried == 2
    assert consumer.stats.handled == 20
    assert consumer.stats.dead_lettered == 0
    assert "rollout not known yet" in consumer.stats.last_error


async def test_poison_is_dead_lettered_at_once_and_the_rest_handled(
    bus: Bus, start_batches: StartBatches
) -> None:
    good = report(1)
    poison = await bus.js.publish("slmops.gateway.report.health.gw-x", b"\xff not json")
    await bus.publish(good)
    seen: list[str] = []

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        seen.extend(e.id for e in batch)

    consumer = await start_batches(handle)
    (letter,) = await await_events(bus, "slmops.deadletter.>", count=1)
    await until(lambda: seen == [good.id], "the good report handled")

    assert isinstance(letter.data, DeadLetter)
    assert "not JSON" in letter.data.reason
    assert letter.data.stream_seq == poison.seq
    assert letter.data.consumer == "test-batches"
    assert consumer.stats.dead_lettered == 1


async def test_a_batch_failing_on_every_delivery_is_dead_lettered(
    bus: Bus, start_batches: StartBatches
) -> None:
    events = [report(i) for i in range(3)]
    for event in events:
        await bus.publish(event)
    deliveries = 0

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        nonlocal deliveries
        deliveries += 1
        raise RuntimeError("fold bug")

    consumer = await start_batches(handle, max_deliver=2)
    letters = await await_events(bus, "slmops.deadletter.>", count=3)

    assert all(isinstance(x.data, DeadLetter) for x in letters)
    assert {x.data.reason for x in letters} == {"failed on all 2 deliveries; last error: fold bug"}
    assert consumer.stats.dead_lettered == 3
    assert deliveries >= 2


async def test_a_slow_batch_is_kept_in_progress_not_redelivered(
    bus: Bus, start_batches: StartBatches
) -> None:
    events = [report(i) for i in range(5)]
    calls: list[list[str]] = []

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        calls.append([e.id for e in batch])
        await asyncio.sleep(2.5)  # 2.5 ack waits: without a beat the other replica gets them

    for event in events:
        await bus.publish(event)
    first = await start_batches(handle, ack_wait_s=1.0)
    await until(lambda: len(calls) == 1, "the first replica's batch")
    second = await start_batches(handle, ack_wait_s=1.0)  # another replica, idle
    await until(lambda: first.stats.handled == 5, "the slow batch handled")
    await until_answered(lambda: all_acked(bus, 5), "every report acked")

    assert sorted(i for call in calls for i in call) == sorted(e.id for e in events)
    assert second.stats.handled == 0


async def test_a_permanent_error_dead_letters_the_batch_at_once(
    bus: Bus, start_batches: StartBatches
) -> None:
    for i in range(2):
        await bus.publish(report(i))
    deliveries = 0

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        nonlocal deliveries
        deliveries += len(batch)
        raise PermanentError("not a fleet this view can fold")

    consumer = await start_batches(handle)
    letters = await await_events(bus, "slmops.deadletter.>", count=2)

    assert {x.data.reason for x in letters} == {"not a fleet this view can fold"}
    assert {x.data.error_type for x in letters} == {"PermanentError"}
    assert deliveries == 2  # no retry
    assert consumer.stats.retried == 0


async def test_a_batch_is_traced_as_the_child_of_its_first_report_linked_to_the_rest(
    bus: Bus, start_batches: StartBatches, span_exporter: InMemorySpanExporter
) -> None:
    events = [report(i) for i in range(5)]
    for event in events:
        await bus.publish(event)

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        return None

    consumer = await start_batches(handle)
    await until(lambda: consumer.stats.handled == 5, "5 reports handled")

    spans = span_exporter.get_finished_spans()
    published = {s.context.span_id: s for s in spans if s.name.startswith("publish ")}
    batches = [s for s in spans if s.name == "process slmops.gateway.report.v1"]
    assert batches
    first = batches[0]
    assert first.parent is not None
    assert first.parent.span_id in published
    linked = {link.context.span_id for s in batches for link in s.links}
    parents = {s.parent.span_id for s in batches if s.parent is not None}
    assert linked | parents == set(published)  # every report's producer is parent or link
    assert sum(s.attributes["messaging.batch.message_count"] for s in batches) == 5
