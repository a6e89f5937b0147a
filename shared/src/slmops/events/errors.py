"""Errors a handler or the runtime raises; the consumer loop turns them into nak or dead-letter."""

from __future__ import annotations

from collections.abc import Iterable


class EventDecodeError(ValueError):
    """The message is not a valid slmops CloudEvent: it is poison and is dead-lettered at once."""


class UnknownEventTypeError(EventDecodeError):
    """The event's ``type`` names no payload model this SDK knows."""


class PermanentError(Exception):
    """A handler's verdict that retrying cannot help (bad input): dead-letter now, no retries."""


class TransientError(Exception):
    """A handler's verdict that retrying may help (a dependency is down): nak with backoff.

    Any other exception is treated the same way; this class exists to say so explicitly.
    """


class PartlyHandled(TransientError):
    """A batch handler's verdict that some of its events could not be handled yet (they name
    something not known yet): those are retried with backoff, the rest of the batch counts as
    handled. A consumer of one event at a time retries that event, as for any TransientError."""

    def __init__(self, message: str, event_ids: Iterable[str]) -> None:
        super().__init__(message)
        self.event_ids = frozenset(event_ids)
