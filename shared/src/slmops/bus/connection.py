"""The NATS connection of one process: reconnects, declares the topology, publishes events.

``publish`` sets ``Nats-Msg-Id`` to the event id, so retrying a publish (after a timeout, or
because a redelivered event is handled again) never stores the event twice, and carries the
W3C trace context in the headers and the CloudEvents ``traceparent`` attribute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

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

from slmops.bus.credentials import NatsCredentials
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
_NO_PLACEMENT_CODE = 10005  # a cluster cannot place the replicas (yet, or ever: too few nodes)
#: How long a stream create/update is asked again while a cluster cannot place its replicas.
PLACEMENT_RETRY_S = 10.0
T = TypeVar("T")


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
        # Called (each in a task of its own) after every reconnect: what a process heard only
        # as core NATS messages (not stored for it) it may have missed while away.
        self.on_reconnect: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._reconnect_tasks: set[asyncio.Task[None]] = set()

    def reconnected(self) -> None:
        """Run the ``on_reconnect`` callbacks (nats-py's reconnected callback calls this)."""
        for callback in self.on_reconnect:
            task = asyncio.create_task(callback())
            self._reconnect_tasks.add(task)
            task.add_done_callback(self._reconnect_tasks.discard)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        source: str,
        tracer: Tracer | None = None,
        connect_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
        credentials: NatsCredentials | None = None,
        first_connect_s: float | None = None,
    ) -> Bus:
        """Connect, reconnecting forever afterwards. nats-py retries the first connect forever
        too (a service waits for its broker); ``first_connect_s`` gives up on it after that long
        with a ConnectionError (a command or a simulator whose user should be told)."""
        credentials = credentials or NatsCredentials()

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):  # an intended close is not news
                log.warning("nats: disconnected from %s", url)

        made: list[Bus] = []  # the Bus, once made: its callbacks run after a reconnect

        async def on_reconnect() -> None:
            log.info(
                "nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else url
            )
            for bus in made:
                bus.reconnected()

        async def on_error(exc: Exception) -> None:
            # A refused subject is a bug in the permissions or an attack: always worth a line.
            if "permissions violation" in str(exc).lower() or "authoriz" in str(exc).lower():
                log.warning("nats: %s", exc)
            else:
                log.debug("nats: %s", exc)

        connecting = nats.connect(
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
            nkeys_seed_str=credentials.nkey_seed,
            inbox_prefix=credentials.inbox_prefix,
            tls=credentials.tls,
        )
        try:
            nc = await asyncio.wait_for(connecting, first_connect_s)
        except TimeoutError:
            raise ConnectionError(
                f"no NATS server answered at {url} within {first_connect_s:g} s"
            ) from None
        made.append(cls(nc, source=source, tracer=tracer, request_timeout_s=request_timeout_s))
        return made[0]

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
        """Create the stream, or update it if its bounds changed. Reads first: a service
        whose identity may not create or change streams finds it declared by the admin."""
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
        current = await self._stream_config(spec.name)
        if current is None:
            try:
                await self._placed(lambda: self.js.add_stream(config))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code not in _ALREADY_EXISTS_CODES:
                    raise
                await self._placed(lambda: self.js.update_stream(config))
        elif _differs(current, config):
            await self._placed(lambda: self.js.update_stream(config))
        self.declared.add(f"stream:{spec.name}")

    async def _stream_config(self, name: str) -> StreamConfig | None:
        try:
            return (await self.js.stream_info(name)).config
        except nats.js.errors.NotFoundError:
            return None

    async def declare_kv(self, spec: KvSpec) -> KeyValue:
        """Create the bucket (direct gets on: a key can then be read by a subject naming it,
        which is what lets a gateway's permissions name its own key only), or update its
        stream in place if its bounds changed, keeping every entry."""
        current = await self._stream_config(spec.stream)
        if current is None:
            try:
                return await self._create_kv(spec)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code not in _ALREADY_EXISTS_CODES:
                    raise
                current = await self._stream_config(spec.stream)
        assert current is not None
        wanted = current.evolve(
            description=spec.description, max_msgs_per_subject=spec.history,
            max_bytes=spec.max_bytes, num_replicas=spec.replicas, allow_direct=True,
        )  # fmt: skip
        if _differs(current, wanted):
            await self._placed(lambda: self.js.update_stream(wanted))
        self.declared.add(f"kv:{spec.bucket}")
        return await self.js.key_value(spec.bucket)

    async def _placed(self, request: Callable[[], Awaitable[T]]) -> T:
        """``request`` (a stream create or update), asked again while a NATS cluster cannot
        place its replicas yet: just after the cluster formed or a node came back, the meta
        leader has not heard from every peer ("no suitable peers for placement")."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PLACEMENT_RETRY_S
        delay_s = 0.05
        while True:
            try:
                return await request()
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _NO_PLACEMENT_CODE or loop.time() + delay_s > deadline:
                    raise
                log.info("stream placement: %s; asking again in %.2fs", exc.description, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)

    async def _create_kv(self, spec: KvSpec) -> KeyValue:
        kv = await self._placed(lambda: self.js.create_key_value(
            KeyValueConfig(
                bucket=spec.bucket,
                description=spec.description,
                history=spec.history,
                ttl=spec.ttl_s or None,
                storage=StorageType.FILE,
                max_bytes=spec.max_bytes,
                replicas=spec.replicas,
                direct=True,
            )
        ))  # fmt: skip
        self.declared.add(f"kv:{spec.bucket}")
        return kv

    async def declare_consumer(self, spec: ConsumerSpec) -> None:
        # Named (not only durable): with one filter subject the create request's subject
        # names the filter, so a permission can allow a consumer on that subject alone.
        single = len(spec.filter_subjects) == 1
        config = ConsumerConfig(
            name=spec.durable,
            durable_name=spec.durable,
            description=spec.description or None,
            filter_subject=spec.filter_subjects[0] if single else None,
            filter_subjects=None if single else list(spec.filter_subjects),
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
            attributes={
                "messaging.system": "nats",
                "messaging.message.id": event.id,
                "messaging.destination.name": event.nats_subject,
            },
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


_COMPARED = ("description", "subjects", "max_age", "max_bytes", "max_msgs_per_subject",
             "discard", "duplicate_window", "num_replicas", "allow_direct")  # fmt: skip


def _differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether ``wanted`` changes a bound ``current`` has (fields left unset are not)."""
    for name in _COMPARED:
        value = getattr(wanted, name)
        if value is None:
            continue
        have = getattr(current, name)
        if isinstance(value, float) or isinstance(have, float):
            if abs(float(have or 0) - float(value)) > 1e-3:
                return True
        elif have != value:
            return True
    return False


async def declare_topology(url: str, topology: Topology, credentials: NatsCredentials) -> None:
    """Declare ``topology`` as ``credentials`` (the admin: services may read streams and
    buckets but not create or change them) and disconnect."""
    bus = await Bus.connect(url, source="/slmops/admin", credentials=credentials)
    try:
        await bus.declare(topology)
    finally:
        await bus.close()
