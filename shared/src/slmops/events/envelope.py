"""CloudEvents 1.0 envelope, structured JSON mode: one event per NATS message.

The envelope is generic over its payload so handlers see typed ``event.data``. Decoding is two
steps - read the envelope, then validate ``data`` against the payload class its ``type`` names -
so a message with an unknown type or a bad payload is rejected with a precise reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmops.events.errors import EventDecodeError

#: Subjects and event types look like ``slmops.<domain>.<what>.v<N>``.
_TYPE_PREFIX = "slmops."


class EventPayload(BaseModel):
    """Base of every event's ``data``. Subclasses set ``event_type``.

    Consumers ignore unknown fields (a newer producer may add some); producers validate strictly
    because they build payloads from typed Python values.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: ClassVar[str]

    def subject_suffix(self) -> str | None:
        """Extra subject token(s) for routing, e.g. the gateway id of an assignment."""
        return None


P = TypeVar("P", bound=EventPayload)


class CloudEvent(BaseModel, Generic[P]):
    """A CloudEvents 1.0 event whose ``data`` is a typed slmops payload."""

    # Unknown extension attributes from other producers are kept, not rejected.
    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=256, description="Unique id; also Nats-Msg-Id.")
    source: str = Field(min_length=1, description="The producing service, e.g. /slmops/registry.")
    type: str = Field(description="slmops.<domain>.<what>.v<N>")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    subject: str | None = Field(None, description="What the event is about (model, variant id).")
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = None
    # CloudEvents distributed-tracing extension; the NATS headers carry the same context.
    traceparent: str | None = None
    tracestate: str | None = None
    data: P

    @field_validator("type")
    @classmethod
    def _slmops_type(cls, value: str) -> str:
        if not value.startswith(_TYPE_PREFIX):
            raise ValueError(f"event type {value!r} does not start with {_TYPE_PREFIX!r}")
        return value

    @property
    def nats_subject(self) -> str:
        """The NATS subject: the event type, plus a routing suffix for per-target events."""
        suffix = self.data.subject_suffix()
        return f"{self.type}.{suffix}" if suffix else self.type

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


@functools.cache
def event_model(payload_type: type[P]) -> type[CloudEvent[P]]:
    """``CloudEvent[payload_type]``. Pydantic caches the parametrized model too, but finding it
    costs ~50 us of typing introspection; this is on every event built."""
    return CloudEvent[payload_type]  # type: ignore[valid-type]


def derive_event_id(*parts: str) -> str:
    """A deterministic event id from the inputs that caused it.

    A redelivered event makes its handler publish the *same* ids again, so JetStream's
    de-duplication (``Nats-Msg-Id``) drops the repeats: effects happen once.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return str(uuid.UUID(digest[:32], version=5))


def variant_id_for(parent_digest: str, recipe: BaseModel, device_class: str) -> str:
    """The deterministic id of the variant a recipe makes of an artifact for a device class.

    Optimizer, registry and validator all derive it, so a repeated or redelivered job finds
    the variant it made before instead of making another one.
    """
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256("\x1f".join((parent_digest, canonical, device_class)).encode())
    return "v-" + digest.hexdigest()[:32]


def release_id_for(model_name: str, version: str) -> str:
    """The deterministic id of a model version's release (one per version)."""
    return "rel-" + hashlib.sha256(f"{model_name}\0{version}".encode()).hexdigest()[:20]


def field_release_id(model_name: str, version: str, detection_id: str) -> str:
    """The deterministic id of the release a re-optimization proposes for one finding."""
    digest = hashlib.sha256(f"{model_name}\0{version}\0{detection_id}".encode()).hexdigest()
    return "rel-field-" + digest[:20]


def new_event(
    data: P,
    *,
    source: str,
    event_id: str | None = None,
    subject: str | None = None,
) -> CloudEvent[P]:
    """Build an event for ``data``; pass ``event_id`` (see :func:`derive_event_id`) for effects
    that must be idempotent under redelivery."""
    return event_model(type(data))(
        id=event_id or str(uuid.uuid4()),
        source=source,
        type=data.event_type,
        subject=subject,
        data=data,
    )


def decode_envelope(raw: bytes) -> dict[str, Any]:
    """Parse a message body as a CloudEvents JSON object, checking only the envelope."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EventDecodeError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise EventDecodeError(f"not a JSON object but {type(obj).__name__}")
    missing = [k for k in ("specversion", "id", "source", "type") if k not in obj]
    if missing:
        raise EventDecodeError(f"not a CloudEvent: missing {', '.join(missing)}")
    if obj["specversion"] != "1.0":
        raise EventDecodeError(f"unsupported specversion {obj['specversion']!r}")
    return obj


def validate_event(obj: dict[str, Any], payload_type: type[P]) -> CloudEvent[P]:
    """Validate an envelope dict against the payload class its type names."""
    try:
        return event_model(payload_type).model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise EventDecodeError(f"invalid {obj.get('type')} event: {problems}") from exc
