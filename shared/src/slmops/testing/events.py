"""Helpers to await events in tests: read what a stream holds, decoded, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.js.api import DeliverPolicy

from slmops.bus.connection import Bus
from slmops.events.envelope import CloudEvent
from slmops.events.registry import decode_event


async def await_events(
    bus: Bus,
    subject: str,
    *,
    count: int,
    timeout_s: float = 10.0,
    where: Callable[[CloudEvent[Any]], bool] | None = None,
) -> list[CloudEvent[Any]]:
    """Wait until the stream holding ``subject`` (wildcards allowed) has ``count`` events on it
    (those ``where`` accepts, if given) and return them in stream order; :class:`TimeoutError`
    naming what arrived otherwise.

    Reads from the start of the stream with an ordered consumer, so events published before
    the call count too.
    """
    sub = await bus.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    events: list[CloudEvent[Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while len(events) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"waited {timeout_s}s for {count} events on {subject!r}, got {len(events)}: "
                    f"{[e.type for e in events]}"
                )
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                continue
            event = decode_event(msg.data)
            if where is None or where(event):
                events.append(event)
    finally:
        await sub.unsubscribe()
    return events


async def stream_count(bus: Bus, stream: str, subject: str | None = None) -> int:
    """How many messages ``stream`` holds (on ``subject``, if given)."""
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    if subject is None:
        return int(info.state.messages)
    return sum((info.state.subjects or {}).values())
