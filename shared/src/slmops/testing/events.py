"""Helpers to await events in tests: read what a stream holds, decoded, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
from nats.js.api import RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from slmops.bus.connection import Bus
from slmops.events.envelope import CloudEvent
from slmops.events.registry import decode_event

_POLL_S = 0.02  # between reads that found nothing new


async def follow_events(
    bus: Bus, subject: str, *, timeout_s: float
) -> AsyncIterator[CloudEvent[Any]]:
    """The events on ``subject`` (wildcards allowed) in stream order, from the stream's start,
    waiting for more as they come; :class:`TimeoutError` once ``timeout_s`` has passed.

    Reads one message at a time by sequence ("the next message on ``subject`` at or after N"):
    each read is one request that holds no state on the server, nothing to lose when the host is
    busy. (An ordered push consumer did: nats-py recreates one after missed heartbeats in a
    background task and, if that request fails, the subscription stays silent for good - a test
    once waited 120 s beside events it never saw.)
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    stream = await bus.js.find_stream_name_by_subject(subject)
    sequence, last_error = 1, ""
    while True:
        if loop.time() >= deadline:
            why = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"waited {timeout_s:g}s on {subject!r}{why}")
        try:
            msg = await bus.js.get_msg(stream, seq=sequence, subject=subject, next=True)
        except NotFoundError:  # nothing (more) on the subject yet
            await asyncio.sleep(_POLL_S)
            continue
        except (nats.errors.TimeoutError, APIError) as exc:  # a busy server, a leader election
            last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(_POLL_S)
            continue
        sequence = (msg.seq or sequence) + 1
        yield decode_event(msg.data or b"")


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
    naming what arrived otherwise. Events published before the call count too."""
    events: list[CloudEvent[Any]] = []
    if count <= 0:
        return events
    try:
        async for event in follow_events(bus, subject, timeout_s=timeout_s):
            if where is None or where(event):
                events.append(event)
                if len(events) >= count:
                    return events
    except TimeoutError as exc:
        raise TimeoutError(
            f"{exc}: wanted {count} events, got {len(events)}: {[e.type for e in events]}"
        ) from None
    raise AssertionError("unreachable: follow_events ends only by its timeout")


async def stored_messages(bus: Bus, subject: str) -> list[RawStreamMsg]:
    """What the stream holding ``subject`` (wildcards allowed) holds on it now, in order: for a
    test whose publishers have all had their acknowledgements (nothing more to wait for)."""
    stream = await bus.js.find_stream_name_by_subject(subject)
    found: list[RawStreamMsg] = []
    sequence = 1
    while True:
        try:
            msg = await bus.js.get_msg(stream, seq=sequence, subject=subject, next=True)
        except NotFoundError:
            return found
        found.append(msg)
        sequence = (msg.seq or sequence) + 1


async def stream_count(bus: Bus, stream: str, subject: str | None = None) -> int:
    """How many messages ``stream`` holds (on ``subject``, if given)."""
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    if subject is None:
        return int(info.state.messages)
    return sum((info.state.subjects or {}).values())
