"""Run EventConsumers inside a test: fast settings and automatic stop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from slmops.bus.connection import Bus
from slmops.bus.consumer import EventConsumer
from slmops.bus.handlers import Handlers
from slmops.settings import ConsumerSettings

StartConsumer = Callable[[Bus, Handlers, ConsumerSettings], Awaitable[EventConsumer]]


def fast_consumer_settings(**overrides: Any) -> ConsumerSettings:
    """Consumer settings for tests: short fetches, quick redelivery, short drain."""
    defaults: dict[str, Any] = {
        "fetch_timeout_s": 0.2,
        "ack_wait_s": 5.0,
        "nak_backoff_base_s": 0.05,
        "nak_backoff_max_s": 0.2,
        "drain_timeout_s": 5.0,
    }
    return ConsumerSettings(**{**defaults, **overrides})


@pytest.fixture
async def start_consumer() -> AsyncIterator[StartConsumer]:
    """``await start_consumer(bus, handlers, settings)`` declares the handlers' consumer as
    service ``test`` and runs it; every consumer started is stopped at the end of the test."""
    started: list[EventConsumer] = []

    async def start(bus: Bus, handlers: Handlers, settings: ConsumerSettings) -> EventConsumer:
        (spec,) = handlers.consumer_specs(
            "test", ack_wait_s=settings.ack_wait_s, max_deliver=settings.max_deliver
        )
        await bus.declare_consumer(spec)
        consumer = EventConsumer(bus, spec, handlers, settings)
        await consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:  # stopping twice is harmless
        await consumer.stop()
