"""Handlers are plain async functions, registered per event type.

A handler takes the typed event (its dependencies are bound by the service's ``app.py``, e.g.
with ``functools.partial``) and returns the events its work produced, or nothing. The runtime
publishes those before it acks the input, so "effects done" includes the events, and a
redelivery re-publishes them under the same deterministic ids (de-duplicated by JetStream).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from slmops.bus.topology import ConsumerSpec, stream_for_subject
from slmops.events.envelope import CloudEvent, EventPayload

HandlerResult = Sequence[CloudEvent[Any]] | None
Handler = Callable[[CloudEvent[Any]], Awaitable[HandlerResult]]
H = TypeVar("H", bound=Handler)


def default_subject(payload_type: type[EventPayload]) -> str:
    """The subject filter for all events of a type (``type.>`` when routed per target)."""
    routed = payload_type.subject_suffix is not EventPayload.subject_suffix
    return f"{payload_type.event_type}.>" if routed else payload_type.event_type


@dataclass(frozen=True)
class Registration:
    payload_type: type[EventPayload]
    handler: Handler
    subjects: tuple[str, ...]


class Handlers:
    """The event-type -> handler table of one service."""

    def __init__(self) -> None:
        self._by_type: dict[str, Registration] = {}

    def register(
        self,
        payload_type: type[EventPayload],
        handler: Handler,
        *,
        subject: str | Sequence[str] | None = None,
    ) -> None:
        """Route ``payload_type`` events to ``handler``; ``subject`` narrows the filter (a
        gateway takes only ``...assignment.v1.<its id>``; the registry only the gateway
        reports of kinds ``applied`` and ``failed``)."""
        if payload_type.event_type in self._by_type:
            raise ValueError(f"a handler for {payload_type.event_type} is already registered")
        subjects = (subject,) if isinstance(subject, str) else tuple(subject or ())
        self._by_type[payload_type.event_type] = Registration(
            payload_type, handler, subjects or (default_subject(payload_type),)
        )

    def on(self, payload_type: type[EventPayload]) -> Callable[[H], H]:
        def decorate(handler: H) -> H:
            self.register(payload_type, handler)
            return handler

        return decorate

    def wrap(self, payload_type: type[EventPayload], wrapper: Callable[[Handler], Handler]) -> None:
        """Put ``wrapper`` around the handler of ``payload_type`` (a service counting what it
        receives, without its handlers knowing); before the consumers start."""
        registration = self._by_type.get(payload_type.event_type)
        if registration is None:
            raise ValueError(f"no handler for {payload_type.event_type} to wrap")
        self._by_type[payload_type.event_type] = replace(
            registration, handler=wrapper(registration.handler)
        )

    def get(self, event_type: str) -> Handler | None:
        registration = self._by_type.get(event_type)
        return registration.handler if registration else None

    def __len__(self) -> int:
        return len(self._by_type)

    def consumer_specs(
        self, service: str, *, ack_wait_s: float, max_deliver: int
    ) -> list[ConsumerSpec]:
        """One durable consumer per stream that holds any of the registered subjects."""
        by_stream: dict[str, list[str]] = {}
        for registration in self._by_type.values():
            for subject in registration.subjects:
                stream = stream_for_subject(subject).name
                by_stream.setdefault(stream, []).append(subject)
        return [
            ConsumerSpec(
                stream=stream,
                durable=durable_name(service, stream),
                filter_subjects=tuple(sorted(subjects)),
                ack_wait_s=ack_wait_s,
                max_deliver=max_deliver,
                description=f"{service}: {', '.join(sorted(subjects))}",
            )
            for stream, subjects in sorted(by_stream.items())
        ]


def durable_name(consumer: str, stream: str) -> str:
    """The durable consumer ``consumer`` (a service, or ``gateway-<id>``) has on ``stream``."""
    return f"{consumer}-{stream.lower().removeprefix('slmops_')}"
