"""Dead-lettering: a message no handler can process is kept with the reason, never dropped.

The dead-letter event is stored (JetStream ack) *before* the original is terminated, so a crash
in between leaves the original in its stream to be tried again, not lost. Its id is derived from
the original's stream position, so dead-lettering the same message twice stores it once.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from nats.aio.msg import Msg

from slmops.bus.connection import Bus
from slmops.events.envelope import CloudEvent, derive_event_id, new_event
from slmops.events.payloads import DeadLetter

log = logging.getLogger(__name__)


def dead_letter_event(
    *,
    consumer: str,
    stream: str,
    stream_seq: int,
    subject: str,
    num_delivered: int,
    data: bytes,
    headers: dict[str, str] | None,
    reason: str,
    error_type: str,
    source: str,
) -> CloudEvent[DeadLetter]:
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    payload = DeadLetter(
        consumer=consumer,
        stream=stream,
        stream_seq=stream_seq,
        subject=subject,
        num_delivered=num_delivered,
        reason=reason[:4000],
        error_type=error_type,
        original_headers=dict(headers or {}),
        original_data=text,
        original_encoding=encoding,
    )
    return new_event(
        payload,
        source=source,
        event_id=derive_event_id("deadletter", stream, str(stream_seq), consumer),
        subject=f"{stream}/{stream_seq}",
    )


async def dead_letter_msg(
    bus: Bus, msg: Msg, *, consumer: str, reason: str, error_type: str
) -> None:
    """Store ``msg`` in the dead-letter stream with ``reason``, then terminate it."""
    meta = msg.metadata
    event = dead_letter_event(
        consumer=consumer,
        stream=meta.stream,
        stream_seq=meta.sequence.stream,
        subject=msg.subject,
        num_delivered=meta.num_delivered,
        data=msg.data,
        headers=msg.headers,
        reason=reason,
        error_type=error_type,
        source=bus.source,
    )
    await bus.publish(event)
    await msg.term()
    log.warning(
        "dead-lettered %s seq %s (%s): %s", meta.stream, meta.sequence.stream, error_type, reason
    )


async def dead_letter_exhausted(bus: Bus, advisory: dict[str, Any], consumer: str) -> None:
    """A message hit ``max_deliver`` without an ack (its handler crashed or hung past
    ``ack_wait`` on the last delivery): JetStream only sends an advisory, so fetch the message
    by sequence and dead-letter it."""
    stream, seq = str(advisory["stream"]), int(advisory["stream_seq"])
    stored = await bus.js.get_msg(stream, seq)
    event = dead_letter_event(
        consumer=consumer,
        stream=stream,
        stream_seq=seq,
        subject=stored.subject or "",
        num_delivered=int(advisory.get("deliveries", 0)),
        data=stored.data or b"",
        headers={k: str(v) for k, v in (stored.headers or {}).items()},
        reason="max_deliver reached without an ack (handler crashed or exceeded ack_wait)",
        error_type="MaxDeliveriesExceeded",
        source=bus.source,
    )
    await bus.publish(event)
    log.warning("dead-lettered %s seq %s after %s", stream, seq, json.dumps(advisory)[:200])
