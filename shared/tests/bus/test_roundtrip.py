"""Publish -> JetStream -> handler, against a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from slmops.bus import PIPELINE, Bus, Handlers
from slmops.events import CloudEvent, ModelPublished, OptimizationFailed, new_event
from slmops.testing.consumers import StartConsumer
from slmops.testing.consumers import fast_consumer_settings as consumer_settings
from slmops.testing.events import await_events, stream_count
from slmops.testing.factories import model_published

pytestmark = pytest.mark.integration


async def test_published_event_reaches_handler_in_one_trace(
    bus: Bus, span_exporter: InMemorySpanExporter, start_consumer: StartConsumer
) -> None:
    received: list[CloudEvent[ModelPublished]] = []
    done = asyncio.Event()

    async def on_published(event: CloudEvent[ModelPublished]) -> None:
        received.append(event)
        done.set()

    handlers = Handlers()
    handlers.register(ModelPublished, on_published)
    consumer = await start_consumer(bus, handlers, consumer_settings())
    sent = model_published()

    ack = await bus.publish(sent)
    await asyncio.wait_for(done.wait(), 10)
    await consumer.stop()

    assert ack.stream == PIPELINE.name
    assert received[0].id == sent.id
    assert isinstance(received[0].data, ModelPublished)
    assert received[0].data == sent.data
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    producer = spans[f"publish {sent.type}"]
    handler_span = spans[f"process {sent.type}"]
    assert producer.kind == SpanKind.PRODUCER
    assert handler_span.kind == SpanKind.CONSUMER
    assert handler_span.context.trace_id == producer.context.trace_id
    assert handler_span.parent is not None
    assert handler_span.parent.span_id == producer.context.span_id
    assert received[0].traceparent is not None
    assert f"{producer.context.trace_id:032x}" in received[0].traceparent


async def test_handler_outputs_are_published_in_the_same_trace_before_ack(
    bus: Bus, span_exporter: InMemorySpanExporter, start_consumer: StartConsumer
) -> None:
    async def on_published(event: CloudEvent[ModelPublished]) -> list[CloudEvent[Any]]:
        failed = OptimizationFailed(
            model_name=event.data.model_name, version=event.data.version, reason="no recipe"
        )
        return [new_event(failed, source="/slmops/test")]

    handlers = Handlers()
    handlers.register(ModelPublished, on_published)
    consumer = await start_consumer(bus, handlers, consumer_settings())
    sent = model_published()

    await bus.publish(sent)
    (output,) = await await_events(bus, OptimizationFailed.event_type, count=1)
    await consumer.stop()

    assert output.data.reason == "no recipe"
    trace_ids = {s.context.trace_id for s in span_exporter.get_finished_spans()}
    assert len(trace_ids) == 1
    assert consumer.stats.handled == 1


async def test_duplicate_publish_with_same_id_is_stored_once(bus: Bus) -> None:
    event = model_published()

    first = await bus.publish(event)
    second = await bus.publish(event)

    assert not first.duplicate
    assert second.duplicate
    assert second.seq == first.seq
    assert await stream_count(bus, PIPELINE.name, ModelPublished.event_type) == 1


async def test_declaring_topology_twice_is_idempotent(bus: Bus) -> None:
    from slmops.bus import Topology

    await bus.publish(model_published())

    await bus.declare(Topology())

    assert await stream_count(bus, PIPELINE.name) == 1
