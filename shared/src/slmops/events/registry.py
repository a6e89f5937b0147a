"""The type name -> payload model map, and decoding of raw messages into typed events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from slmops.events.envelope import (
    CloudEvent,
    EventPayload,
    decode_envelope,
    event_model,
    validate_event,
)
from slmops.events.errors import EventDecodeError, UnknownEventTypeError
from slmops.events.payloads import CORE_EVENT_TYPES

EVENT_TYPES: dict[str, type[EventPayload]] = {cls.event_type: cls for cls in CORE_EVENT_TYPES}


def payload_type(event_type: str) -> type[EventPayload]:
    try:
        return EVENT_TYPES[event_type]
    except KeyError:
        raise UnknownEventTypeError(f"unknown event type {event_type!r}") from None


def _type_of(value: Any) -> str | None:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


# One validator for every known event, picked by its ``type``: a valid message is parsed and
# validated in a single pass inside pydantic-core (about half the cost of json.loads + validate).
_ANY_EVENT: TypeAdapter[CloudEvent[Any]] = TypeAdapter(
    Annotated[  # type: ignore[arg-type]  # a union built at import time from EVENT_TYPES
        Union[tuple(Annotated[event_model(cls), Tag(name)] for name, cls in EVENT_TYPES.items())],  # noqa: UP007
        Discriminator(_type_of),
    ]
)


def decode_event(raw: bytes) -> CloudEvent[Any]:
    """Bytes of a NATS message -> a typed event, or :class:`EventDecodeError` saying why not."""
    try:
        return _ANY_EVENT.validate_json(raw)
    except ValidationError:  # the slow path says precisely what is wrong
        obj = decode_envelope(raw)
        return validate_event(obj, payload_type(str(obj["type"])))


def decode_message(subject: str, raw: bytes) -> CloudEvent[Any]:
    """A message as a consumer takes it: :func:`decode_event`, and the subject it arrived on must
    be the one its payload belongs on (``event.nats_subject``: a report of gateway A on A's
    subject). NATS lets a publisher use only its own subjects (a gateway: its own reports), so
    this binds what a message says to who could send it: a gateway cannot speak for another."""
    return check_subject(decode_event(raw), subject)


def check_subject(event: CloudEvent[Any], subject: str) -> CloudEvent[Any]:
    """``event``, or :class:`EventDecodeError` when it did not arrive on its own subject."""
    expected = event.nats_subject
    if subject != expected:
        raise EventDecodeError(
            f"{event.type} {event.id} arrived on {subject!r}, not on {expected!r} where its "
            "payload belongs: refused (a publisher may speak only for itself)"
        )
    return event


def decoder_for(*payloads: type[EventPayload]) -> Callable[[bytes], CloudEvent[Any]]:
    """A decoder for a consumer of mostly these event types: each validated by its type's own
    model (a third faster than the all-types union), picked by the ``"type":"..."`` the
    message carries (as ours are serialized); anything else as :func:`decode_event` decodes
    it, or its precise refusal."""
    models = [(f'"type":"{p.event_type}"'.encode(), event_model(p)) for p in payloads]

    def decode(raw: bytes) -> CloudEvent[Any]:
        for marker, model in models:
            if marker in raw:
                try:
                    return model.model_validate_json(raw)
                except ValidationError:
                    break  # the slow path says precisely what is wrong (or another producer's)
        return decode_event(raw)

    return decode
