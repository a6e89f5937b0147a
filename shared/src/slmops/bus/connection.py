"""The NATS connection of one process: reconnects, declares the topology, publishes events.

``publish`` sets ``Nats-Msg-Id`` to the event id, so retrying a publish (after a timeout, or
because a redelivered event is handled again) never stores the event twice, and carries the
W3C trace context in the headers and the CloudEvents ``traceparent`` attribute.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    PubAck,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from slmops.bus.topology import ConsumerSpec, KvSpec, StreamSpec, Topology
from slmops.events.envelope import CloudEvent
from slmops.tracing import w3c_trace_headers

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
#: Errors after which a publish is worth repeating: the broker is restarting or slow.
RETRYABLE_PUBLISH_ERRORS = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
)
_ALREADY_EXISTS_CODES = {10058, 10148}  # stream / consumer exists with another config


class Bus:
    """One NATS connection + JetStream context for one service (``source`` of its events)."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        source: str,
        tracer: Tracer | None = None,
        request_timeout_s: float = 5.0,
        publish_retry_s: float = 15.0,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=request_timeout_s)
        self.request_timeout_s = request_timeout_s
        self.source = source
        self.tracer = tracer or trace.get_tracer("slmops.bus")
        self.publish_retry_s = publish_retry_s
        self.declared: set[str] = set()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        source: str,
        tracer: Tracer | None = None,
        connect_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
    ) -> Bus:
        """Connect, reconnecting forever afterwards; the first connect fails fast."""

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):  # an intended close is not news
                log.warning("nats: disconnected from %s", url)

        async def on_reconnect() -> None:
            log.info(
                "nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else url
            )

        async def on_error(exc: Exception) -> None:
            log.debug("nats: %s", exc)

        nc = await nats.connect(
            servers=[u.strip() for u in url.split(",")],
            name=source,
            connect_timeout=connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            drain_timeout=5,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
        return cls(nc, source=source, tracer=tracer, request_timeout_s=request_timeout_s)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    # --- topology -------------------------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        """Create or update every stream, KV bucket and consumer of ``topology``."""
        for stream in topology.streams:
            await self.declare_stream(stream)
        for bucket in topology.kv_buckets:
            await self.declare_kv(bucket)
        for consumer in topology.consumers:
            await self.declare_consumer(consumer)

    async def declare_stream(self, spec: StreamSpec) -> None:
        config = StreamConfig(
            name=spec.name,
            description=spec.description,
            subjects=list(spec.subjects),
            storage=StorageType.FILE,
            max_age=spec.max_age_s,
            max_bytes=spec.max_bytes,
            max_msgs_per_subject=spec.max_msgs_per_subject,
            discard=DiscardPolicy.NEW if spec.discard_new else DiscardPolicy.OLD,
            duplicate_window=spec.duplicate_window_s,
            num_replicas=spec.replicas,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code not in _ALREADY_EXISTS_CODES:
                raise
            await self.js.update_stream(config)
        self.declared.add(f"stream:{spec.name}")

    async def declare_kv(self, spec: KvSpec) -> KeyValue:
        try:
            kv = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=spec.bucket,
                    description=spec.description,
                    history=spec.history,
                    ttl=spec.ttl_s or None,
                    storage=StorageType.FILE,
                    max_bytes=spec.max_bytes,
                    replicas=spec.replicas,
                )
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code not in _ALREADY_EXISTS_CODES:
                raise
            # The bucket exists with other bounds (declared by an older release): update its
            # stream in place, keeping every entry.
            info = await self.js.stream_info(f"KV_{spec.bucket}")
            await self.js.update_stream(info.config.evolve(
                description=spec.description, max_msgs_per_subject=spec.history,
                max_bytes=spec.max_bytes, num_replicas=spec.replicas,
            ))  # fmt: skip
            kv = await self.js.key_value(spec.bucket)
        self.declared.add(f"kv:{spec.bucket}")
        return kv

    async def declare_consumer(self, spec: ConsumerSpec) -> None:
        config = ConsumerConfig(
            durable_name=spec.durable,
            description=spec.description or None,
            filter_subjects=list(spec.filter_subjects),
            ack_wait=spec.ack_wait_s,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
        )
        await self.js.add_consumer(spec.stream, config)
        self.declared.add(f"consumer:{spec.stream}/{spec.durable}")

    async def key_value(self, bucket: str) -> KeyValue:
        return await self.js.key_value(bucket)

    # --- publishing -----------------------------------------------------------------------

    def _encode(self, event: CloudEvent[Any]) -> tuple[bytes, dict[str, str], Span]:
        """Start the producer span; the body and headers carry its context and the id."""
        span = self.tracer.start_span(
            f"publish {event.type}",
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.message.id": event.id},
        )
        headers = {MSG_ID_HEADER: event.id}
        trace_headers = w3c_trace_headers(span.get_span_context())
        if trace_headers:
            headers.update(trace_headers)
            if event.traceparent is None:  # also the CloudEvents distributed-tracing extension
                event = event.model_copy(update=trace_headers)
        return event.to_json(), headers, span

    async def publish(self, event: CloudEvent[Any]) -> PubAck:
        """Publish and wait for JetStream to store it; retries while the broker is away.

        Returns the ack; ``ack.duplicate`` is true when the id had been stored already.
        """
        payload, headers, span = self._encode(event)
        subject = event.nats_subject
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_retry_s
        delay_s = 0.05
        with trace.use_span(span, end_on_exit=True):
            while True:
                try:
                    return await self.js.publish(subject, payload, headers=headers)
                except RETRYABLE_PUBLISH_ERRORS as exc:
                    if loop.time() + delay_s > deadline:
                        raise
                    log.info("publish %s: %s; retrying in %.2fs", event.id, exc, delay_s)
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 1.0)

    async def publish_nowait(self, event: CloudEvent[Any]) -> asyncio.Future[PubAck]:
        """Pipelined publish: returns a future of the ack (no retry; for bulk producers)."""
        payload, headers, span = self._encode(event)
        try:
            return await self.js.publish_async(event.nats_subject, payload, headers=headers)
        finally:
            span.end()

    async def close(self) -> None:
        """Flush what is buffered and close (pending pulls end)."""
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (nats.errors.ConnectionClosedError, nats.errors.FlushTimeoutError):
                await self.nc.close()
