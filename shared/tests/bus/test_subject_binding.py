"""A message must arrive on the subject its payload belongs on: NATS lets a gateway publish only
on its own subjects, so a report claiming another gateway's id is refused by every consumer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from slmops.bus import FLEET, BatchConsumer, Bus, Handlers
from slmops.bus.topology import ConsumerSpec
from slmops.events import CloudEvent, DeadLetter, GatewayReport, HealthAggregate, new_event
from slmops.testing.consumers import StartConsumer, fast_consumer_settings
from slmops.testing.events import await_events
from slmops.testing.polling import until

pytestmark = pytest.mark.integration


def _report(gateway_id: str) -> CloudEvent[GatewayReport]:
    health = HealthAggregate(window_s=30.0, request_count=10, error_rate=0.0)
    payload = GatewayReport(gateway_id=gateway_id, kind="health", device_class="x86",
                            variant_id="v-1", health=health)  # fmt: skip
    return new_event(payload, source=f"/slmops/gateway/{gateway_id}")


async def _publish_as(bus: Bus, subject_gateway: str, event: CloudEvent[GatewayReport]) -> int:
    """``event`` published on ``subject_gateway``'s report subject (what that gateway may do)."""
    ack = await bus.js.publish(f"{GatewayReport.event_type}.health.{subject_gateway}",
                               event.to_json(), headers={"Nats-Msg-Id": event.id})  # fmt: skip
    return int(ack.seq)


def _assert_refused(letter: CloudEvent[Any], forged: CloudEvent[GatewayReport], seq: int) -> None:
    assert isinstance(letter.data, DeadLetter)
    assert letter.data.stream_seq == seq
    assert f"arrived on '{GatewayReport.event_type}.health.gw-mallory'" in letter.data.reason
    assert f"not on '{forged.nats_subject}'" in letter.data.reason
    assert "a publisher may speak only for itself" in letter.data.reason


async def test_the_event_consumer_refuses_a_report_in_another_gateways_name(
    bus: Bus, start_consumer: StartConsumer
) -> None:
    seen: list[str] = []

    async def on_report(event: CloudEvent[GatewayReport]) -> None:
        seen.append(event.data.gateway_id)

    handlers = Handlers()
    handlers.register(GatewayReport, on_report)
    consumer = await start_consumer(bus, handlers, fast_consumer_settings())
    forged, genuine = _report("gw-alice"), _report("gw-mallory")

    seq = await _publish_as(bus, "gw-mallory", forged)  # mallory's subject, alice's name
    await _publish_as(bus, "gw-mallory", genuine)
    (letter,) = await await_events(bus, "slmops.deadletter.>", count=1)
    await until(lambda: seen == ["gw-mallory"], "the genuine report handled", timeout_s=10)

    _assert_refused(letter, forged, seq)
    assert consumer.stats.dead_lettered == 1


@pytest.fixture
async def batches(bus: Bus) -> AsyncIterator[Callable[..., Awaitable[BatchConsumer]]]:
    started: list[BatchConsumer] = []

    async def start(handle: Callable[[list[CloudEvent[Any]]], Awaitable[None]]) -> BatchConsumer:
        spec = ConsumerSpec(FLEET.name, "test-binding", ("slmops.gateway.report.>",),
                            ack_wait_s=5.0, max_deliver=3)  # fmt: skip
        await bus.declare_consumer(spec)
        consumer = BatchConsumer(bus, spec, handle, fast_consumer_settings(fetch_batch=100))
        await consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        await consumer.stop()


async def test_the_batch_consumer_refuses_a_report_in_another_gateways_name(
    bus: Bus, batches: Callable[..., Awaitable[BatchConsumer]]
) -> None:
    seen: list[str] = []

    async def handle(batch: list[CloudEvent[Any]]) -> None:
        seen.extend(e.data.gateway_id for e in batch)

    forged, genuine = _report("gw-alice"), _report("gw-mallory")
    seq = await _publish_as(bus, "gw-mallory", forged)
    await _publish_as(bus, "gw-mallory", genuine)
    consumer = await batches(handle)
    (letter,) = await await_events(bus, "slmops.deadletter.>", count=1)
    await until(lambda: seen == ["gw-mallory"], "the genuine report handled")

    _assert_refused(letter, forged, seq)
    assert consumer.stats.dead_lettered == 1
