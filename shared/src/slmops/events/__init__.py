"""Event contracts: the CloudEvents envelope, typed payloads, decoding and JSON Schemas."""

from slmops.events.envelope import (
    CloudEvent,
    EventPayload,
    derive_event_id,
    field_release_id,
    new_event,
    release_id_for,
    variant_id_for,
)
from slmops.events.errors import (
    EventDecodeError,
    PartlyHandled,
    PermanentError,
    TransientError,
    UnknownEventTypeError,
)
from slmops.events.payloads import *  # noqa: F403 - the payload models are the public API
from slmops.events.payloads import CORE_EVENT_TYPES
from slmops.events.registry import (
    EVENT_TYPES,
    check_subject,
    decode_event,
    decode_message,
    payload_type,
)

__all__ = [
    "CORE_EVENT_TYPES",
    "EVENT_TYPES",
    "CloudEvent",
    "EventDecodeError",
    "EventPayload",
    "PartlyHandled",
    "PermanentError",
    "TransientError",
    "UnknownEventTypeError",
    "check_subject",
    "decode_event",
    "decode_message",
    "derive_event_id",
    "field_release_id",
    "new_event",
    "payload_type",
    "release_id_for",
    "variant_id_for",
]
