"""What every service process runs besides its own API: NATS, topology, consumers, store.

The runtime connects in the background and keeps retrying, so a service whose broker or store
is not up yet still starts and answers ``/healthz``; ``/readyz`` says which dependency is
missing. Stop drains the consumers (running handlers finish and ack) before closing.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider

from slmops.bus.connection import Bus
from slmops.bus.consumer import EventConsumer
from slmops.bus.credentials import NatsCredentials
from slmops.bus.handlers import Handlers
from slmops.bus.topology import ConsumerSpec, Topology
from slmops.objectstore import ObjectStore, ObjectStoreError
from slmops.service.metrics import ServiceMetrics
from slmops.settings import ServiceSettings
from slmops.tasks import cancel_and_wait
from slmops.tracing import setup_tracing

log = logging.getLogger(__name__)


@dataclass
class Check:
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass
class Readiness:
    service: str
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "ready": self.ready,
            "not_ready": [name for name, check in self.checks.items() if not check.ok],
            "checks": {name: check.as_dict() for name, check in self.checks.items()},
        }


class Dependency(Protocol):
    """Something else a service runs (e.g. the optimizer's Ray Serve app): started with the
    runtime (in the background: ``start`` returns at once), stopped after the consumers drained,
    and reported by ``/readyz``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check(self) -> Check: ...


class BackgroundTask(ABC):
    """A :class:`Dependency` that runs :meth:`run` for the runtime's lifetime (a gateway's
    reconcile-and-report loop, the rollout ticker): started with it, cancelled at stop."""

    task_name = "background task"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    async def run(self) -> None: ...

    @abstractmethod
    async def check(self) -> Check: ...

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)


class ServiceRuntime:
    """The NATS/JetStream side of one service, plus its object store client."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        handlers: Handlers | None = None,
        *,
        uses_object_store: bool = True,
        tracer_provider: TracerProvider | None = None,
        consumer_name: str | None = None,
        identity: str | None = None,
        buckets: tuple[str, ...] | None = None,
    ) -> None:
        """``consumer_name`` names the durable consumers (default: the service's name); a
        process that must not share a consumer with its peers (a gateway: its own assignments
        only) gives its own. ``identity`` names the local stack's credentials the process
        uses (default ``service-<name>``). With ``buckets`` it declares only those KV buckets
        and the streams of its own consumers (a gateway may see nothing else)."""
        self.name = name
        self.identity = identity or f"service-{name}"
        self.settings = settings
        self.handlers = handlers or Handlers()
        self.metrics = ServiceMetrics(name)  # this process's own registry: served at /metrics
        self.tracer_provider = tracer_provider or setup_tracing(
            f"slmops-{name}", trace_dir=settings.platform.trace_dir
        )
        self.store = ObjectStore.from_settings(settings.platform) if uses_object_store else None
        consumer = settings.consumer
        platform = settings.platform
        self.topology = Topology(
            consumers=self.handlers.consumer_specs(
                consumer_name or name,
                ack_wait_s=consumer.ack_wait_s,
                max_deliver=consumer.max_deliver,
            )
        ).sized(platform.jetstream_replicas, platform.stream_max_gb)
        if buckets is not None:
            self.topology = self.topology.narrowed(buckets)
        self.bus: Bus | None = None
        self.consumers: list[EventConsumer] = []
        self.bucket_ready = False
        self._startup_error = "not started"
        self._starter: asyncio.Task[None] | None = None
        self.dependencies: dict[str, Dependency] = {}
        self._buckets: dict[str, KeyValue] = {}
        # Durables this process pulls in batches (slmops.bus.batches), each run by a task of
        # its own rather than this runtime's loop: listed so deployment and tests see every
        # durable the service uses.
        self.batch_consumers: list[ConsumerSpec] = []

    async def key_value(self, bucket: str) -> KeyValue | None:
        """A KV bucket of the topology (opened once), or None until NATS is connected and the
        bucket declared - callers answer 503 or retry the event."""
        bus = self.bus
        if bus is None or f"kv:{bucket}" not in bus.declared:
            return None
        if bucket not in self._buckets:
            self._buckets[bucket] = await bus.key_value(bucket)
        return self._buckets[bucket]

    def add_batch_consumer(self, spec: ConsumerSpec) -> ConsumerSpec:
        """Record a durable this process pulls in batches; returns ``spec``."""
        self.batch_consumers.append(spec)
        return spec

    async def report_lag(self, spec: ConsumerSpec | None) -> None:
        """A batch consumer's lag in the metrics (the runtime reports its own consumers')."""
        bus = self.bus
        if bus is None or spec is None or not bus.connected:
            return
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        self.metrics.consumer_pending.labels(spec.durable).set(info.num_pending or 0)
        self.metrics.consumer_ack_pending.labels(spec.durable).set(info.num_ack_pending or 0)

    def add_dependency(self, name: str, dependency: Dependency) -> None:
        """Run ``dependency`` with this runtime and report it as readiness check ``name``."""
        self.dependencies[name] = dependency

    @property
    def source(self) -> str:
        return f"/slmops/{self.name}"

    async def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        for dependency in self.dependencies.values():
            await dependency.start()
        self._starter = asyncio.create_task(self._start_until_done(), name=f"{self.name} start")

    async def wait_started(self, timeout_s: float) -> None:
        if self._starter is not None:
            await asyncio.wait_for(asyncio.shield(self._starter), timeout_s)

    async def _start_until_done(self) -> None:
        pause_s = 0.2
        while True:
            try:
                await self._start_once()
                self._startup_error = ""
                log.info("%s: connected, topology declared, %d consumer(s) running",
                         self.name, len(self.consumers))  # fmt: skip
                return
            except Exception as exc:  # keep the process up; readiness reports the reason
                self._startup_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: start failed (%s); retrying in %.1fs",
                            self.name, self._startup_error, pause_s)  # fmt: skip
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, 5.0)

    async def _start_once(self) -> None:
        if self.store is not None and not self.bucket_ready:
            await asyncio.to_thread(self.store.ensure_bucket)
            self.bucket_ready = True
        platform = self.settings.platform
        if self.bus is None:
            self.bus = await Bus.connect(
                platform.nats_url,
                source=self.source,
                tracer=self.tracer_provider.get_tracer(f"slmops.{self.name}"),
                connect_timeout_s=platform.nats_connect_timeout_s,
                request_timeout_s=platform.nats_request_timeout_s,
                credentials=NatsCredentials.from_settings(platform, self.identity),
            )
        await self.bus.declare(self.topology)
        for spec in self.topology.consumers[len(self.consumers) :]:
            consumer = EventConsumer(self.bus, spec, self.handlers, self.settings.consumer,
                                     observer=self.metrics, service=self.name)  # fmt: skip
            await consumer.start()
            self.consumers.append(consumer)

    async def stop(self) -> None:
        if self._starter is not None:
            await cancel_and_wait(self._starter)
        for consumer in self.consumers:
            await consumer.stop()
        for dependency in self.dependencies.values():
            await dependency.stop()
        if self.bus is not None:
            await self.bus.close()
        if self.store is not None:
            self.store.close()
        self.tracer_provider.force_flush()

    @asynccontextmanager
    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        """FastAPI lifespan: start with the app, drain and stop with it."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def readiness(self) -> Readiness:
        report = Readiness(self.name)
        bus = self.bus
        connected = bus is not None and bus.connected
        report.checks["nats"] = Check(
            connected,
            # No URL here: readiness answers anonymous callers, and a URL may carry secrets.
            "connected" if connected else f"not connected: {self._startup_error}",
        )
        wanted = {f"stream:{s.name}" for s in self.topology.streams}
        wanted |= {f"kv:{b.bucket}" for b in self.topology.kv_buckets}
        wanted |= {f"consumer:{c.stream}/{c.durable}" for c in self.topology.consumers}
        missing = sorted(wanted - (bus.declared if bus else set()))
        report.checks["topology"] = Check(
            not missing, f"missing: {', '.join(missing)}" if missing else f"{len(wanted)} declared"
        )
        stopped = [c.spec.durable for c in self.consumers if not c.running]
        idle = len(self.consumers) < len(self.topology.consumers)
        report.checks["consumers"] = Check(
            not stopped and not idle,
            f"not running: {', '.join(stopped) or 'not started yet'}"
            if stopped or idle
            else (", ".join(c.spec.durable for c in self.consumers) or "none (no handlers)"),
        )
        if self.store is not None:
            report.checks["object_store"] = await self._store_check(self.store)
        for name, dependency in self.dependencies.items():
            report.checks[name] = await dependency.check()
        return report

    async def _store_check(self, store: ObjectStore) -> Check:
        try:
            await asyncio.to_thread(store.ping)
        except ObjectStoreError as exc:
            return Check(False, str(exc))
        return Check(True, f"bucket {store.bucket} reachable")
