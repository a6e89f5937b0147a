"""The type name -> payload model map, and decoding of raw messages into typed events."""

from __future__ import annotations

from typing import Any

from slmops.events.envelope import CloudEvent, EventPayload, decode_envelope, validate_event
from slmops.events.errors import UnknownEventTypeError
from slmops.events.payloads import CORE_EVENT_TYPES

EVENT_TYPES: dict[str, type[EventPayload]] = {cls.event_type: cls for cls in CORE_EVENT_TYPES}


def payload_type(event_type: str) -> type[EventPayload]:
    try:
        return EVENT_TYPES[event_type]
    except KeyError:
        raise UnknownEventTypeError(f"unknown event type {event_type!r}") from None


def decode_event(raw: bytes) -> CloudEvent[Any]:
    """Bytes of a NATS message -> a typed event, or :class:`EventDecodeError` saying why not."""
    obj = decode_envelope(raw)
    return validate_event(obj, payload_type(str(obj["type"])))
