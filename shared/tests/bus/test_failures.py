"""Bad messages and failing handlers: nothing is lost, the consumer keeps going."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from slmops.bus import DEAD_LETTER, PIPELINE, Bus, Handlers
from slmops.events import CloudEvent, DeadLetter, ModelPublished, PermanentError
from slmops.testing.consumers import StartConsumer, fast_consumer_settings
from slmops.testing.events import await_events
from slmops.testing.factories import model_published

pytestmark = pytest.mark.integration

SUBJECT = ModelPublished.event_type


def recording_handlers(seen: list[str]) -> Handlers:
    async def on_published(event: CloudEvent[ModelPublished]) -> None:
        seen.append(event.id)

    handlers = Handlers()
    handlers.register(ModelPublished, on_published)
    return handlers


@pytest.mark.parametrize(
    ("body", "reason_part"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (json.dumps({"specversion": "1.0", "id": "x"}).encode(), "missing source, type"),
        (
            json.dumps(
                {"specversion": "1.0", "id": "x", "source": "/t", "type": SUBJECT, "data": {}}
            ).encode(),
            "invalid slmops.model.published.v1 event: data.model_name: Field required",
        ),
        (
            json.dumps(
                {"specversion": "1.0", "id": "x", "source": "/t", "type": "slmops.model.nope.v1"}
            ).encode(),
            "unknown event type 'slmops.model.nope.v1'",
        ),
    ],
    ids=["not-json", "not-object", "not-cloudevent", "wrong-schema", "unknown-type"],
)
async def test_poison_message_is_dead_lettered_and_next_event_handled(
    bus: Bus, start_consumer: StartConsumer, body: bytes, reason_part: str
) -> None:
    seen: list[str] = []
    consumer = await start_consumer(bus, recording_handlers(seen), fast_consumer_settings())
    good = model_published()

    poison_ack = await bus.js.publish(SUBJECT, body, headers={"X-Origin": "test"})
    await bus.publish(good)
    (letter,) = await await_events(bus, "slmops.deadletter.>", count=1)
    await asyncio.wait_for(_until(lambda: good.id in seen), 10)

    assert isinstance(letter.data, DeadLetter)
    assert reason_part in letter.data.reason
    assert letter.data.stream == PIPELINE.name
    assert letter.data.stream_seq == poison_ack.seq
    assert letter.data.consumer == "test-pipeline"
    assert letter.data.original_headers["X-Origin"] == "test"
    original = letter.data.original_data
    if letter.data.original_encoding == "base64":
        import base64

        assert base64.b64decode(original) == body
    else:
        assert original.encode() == body
    assert seen == [good.id]
    assert consumer.stats.dead_lettered == 1


async def test_transient_error_is_retried_with_backoff_until_it_succeeds(
    bus: Bus, start_consumer: StartConsumer
) -> None:
    attempts: list[int] = []

    async def flaky(event: CloudEvent[ModelPublished]) -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise ConnectionError("object store unavailable")

    handlers = Handlers()
    handlers.register(ModelPublished, flaky)
    consumer = await start_consumer(bus, handlers, fast_consumer_settings(max_deliver=5))

    await bus.publish(model_published())
    await asyncio.wait_for(_until(lambda: consumer.stats.handled == 1), 10)

    assert attempts == [1, 2, 3]
    assert consumer.stats.retried == 2
    assert consumer.stats.dead_lettered == 0


async def test_event_failing_every_delivery_goes_to_dead_letter_with_last_error(
    bus: Bus, start_consumer: StartConsumer
) -> None:
    calls: list[str] = []

    async def always_fails(event: CloudEvent[ModelPublished]) -> None:
        calls.append(event.id)
        raise RuntimeError(f"boom #{len(calls)}")

    handlers = Handlers()
    handlers.register(ModelPublished, always_fails)
    await start_consumer(bus, handlers, fast_consumer_settings(max_deliver=3))
    sent = model_published()

    await bus.publish(sent)
    (letter,) = await await_events(bus, "slmops.deadletter.>", count=1)

    assert len(calls) == 3
    assert letter.data.num_delivered == 3
    assert letter.data.error_type == "RuntimeError"
    assert "failed on all 3 deliveries; last error: boom #3" in letter.data.reason
    assert json.loads(letter.data.original_data)["id"] == sent.id


async def test_permanent_error_dead_letters_without_retry(
    bus: Bus, start_consumer: StartConsumer
) -> None:
    calls: list[str] = []

    async def rejects(event: CloudEvent[ModelPublished]) -> None:
        calls.append(event.id)
        raise PermanentError("format 'onnx' but the blob is a tar")

    handlers = Handlers()
    handlers.register(ModelPublished, rejects)
    await start_consumer(bus, handlers, fast_consumer_settings(max_deliver=5))

    await bus.publish(model_published())
    (letter,) = await await_events(bus, f"{DEAD_LETTER.subjects[0]}", count=1)

    assert len(calls) == 1
    assert letter.data.reason == "format 'onnx' but the blob is a tar"
    assert letter.data.error_type == "PermanentError"


async def test_long_handler_keeps_its_message_with_in_progress_acks(
    bus: Bus, start_consumer: StartConsumer
) -> None:
    deliveries: list[int] = []

    async def slow(event: CloudEvent[ModelPublished]) -> None:
        deliveries.append(1)
        await asyncio.sleep(3.5)  # > 3 x ack_wait

    handlers = Handlers()
    handlers.register(ModelPublished, slow)
    consumer = await start_consumer(bus, handlers, fast_consumer_settings(ack_wait_s=1.0))

    await bus.publish(model_published())
    await asyncio.wait_for(_until(lambda: consumer.stats.handled == 1), 15)
    await asyncio.sleep(1.5)  # a redelivery would show up within one ack_wait

    assert deliveries == [1]


async def test_concurrency_is_bounded(bus: Bus, start_consumer: StartConsumer) -> None:
    running, peak = 0, 0

    async def busy(event: CloudEvent[ModelPublished]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.1)
        running -= 1

    handlers = Handlers()
    handlers.register(ModelPublished, busy)
    consumer = await start_consumer(bus, handlers, fast_consumer_settings(max_concurrency=3))

    for _ in range(12):
        await bus.publish(model_published())
    await asyncio.wait_for(_until(lambda: consumer.stats.handled == 12), 15)

    assert peak == 3


async def test_stop_lets_running_handlers_finish_and_ack(
    bus: Bus, start_consumer: StartConsumer
) -> None:
    started, finished = asyncio.Event(), []

    async def slowish(event: CloudEvent[ModelPublished]) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(event.id)

    handlers = Handlers()
    handlers.register(ModelPublished, slowish)
    consumer = await start_consumer(bus, handlers, fast_consumer_settings())
    sent = model_published()

    await bus.publish(sent)
    await asyncio.wait_for(started.wait(), 10)
    await consumer.stop()
    info = await bus.js.consumer_info(PIPELINE.name, consumer.spec.durable)

    assert finished == [sent.id]
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


async def test_message_exhausted_by_a_crashed_consumer_is_dead_lettered(
    bus: Bus, start_consumer: StartConsumer
) -> None:
    # The last allowed delivery went to a process that died before acking (a raw pull that
    # never acks): JetStream only emits an advisory, and the runtime dead-letters from it.
    seen: list[str] = []
    handlers = recording_handlers(seen)
    (spec,) = handlers.consumer_specs("test", ack_wait_s=1.0, max_deliver=1)
    await bus.declare_consumer(spec)
    crashed = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    sent = model_published()
    await bus.publish(sent)
    (stolen,) = await crashed.fetch(1, timeout=5)

    await start_consumer(bus, handlers, fast_consumer_settings(max_deliver=1, ack_wait_s=1.0))
    (letter,) = await await_events(bus, "slmops.deadletter.>", count=1, timeout_s=15)
    await crashed.unsubscribe()

    assert json.loads(stolen.data)["id"] == sent.id
    assert seen == []
    assert letter.data.error_type == "MaxDeliveriesExceeded"
    assert json.loads(letter.data.original_data)["id"] == sent.id


async def _until(predicate: Any, interval_s: float = 0.02) -> None:
    while not predicate():
        await asyncio.sleep(interval_s)
