"""Wiring of the gateway service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import nats.js.errors
from fastapi import FastAPI
from nats.aio.msg import Msg
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from slmops.bus import Bus, Handlers
from slmops.bus.handlers import durable_name
from slmops.bus.permissions import ASSIGNMENT_SUBJECT, COHORT_BUCKET, COHORT_SUBJECT
from slmops.bus.topology import ROLLOUT
from slmops.cohorts import COHORT_EVENT, CohortState, cohort_key
from slmops.events import GatewayAssignment, GatewayReport
from slmops.events.payloads import BATCHED_REPORT_KINDS
from slmops.events.reports import report_event
from slmops.service import BackgroundTask, Check, ServiceRuntime, create_service_app, serve
from slmops.service.registry_api import RegistryClient
from slmops.tracing import extract_trace_context
from slmops.trust.client import TrustClient
from slmops_gateway.agent import DESIRED_BUCKET, Agent
from slmops_gateway.api import router
from slmops_gateway.handlers import build_handlers
from slmops_gateway.metrics import register as register_metrics
from slmops_gateway.notifications import heard_assignment, heard_cohort_state
from slmops_gateway.openai_api import router as openai_router
from slmops_gateway.pool import GenerationPool
from slmops_gateway.relay import send_via_relay
from slmops_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class AgentLoop(BackgroundTask):
    """On connect: register, then reconcile with the desired state (a gateway that was offline
    catches up); afterwards report health aggregates every ``health_interval_s``.

    A gateway that follows its cohort hears its own assignments (exceptions: a rollback of it
    alone) as core NATS messages on its own subject, as the rollout service stores them - no
    durable consumer of its own on the server (a fleet's worth of them is what a NATS cluster
    cannot carry: each is a replicated consumer). What it misses while away it reads from the
    desired state on every reconnect. A gateway without the cohort protocol keeps its own
    durable consumer (the runtime's handlers).
    """

    task_name = "gateway agent"

    def __init__(self, agent: Agent, runtime: ServiceRuntime) -> None:
        super().__init__()
        self.agent, self.runtime = agent, runtime
        self._tasks: set[asyncio.Task[None]] = set()
        self.registered = asyncio.Event()  # it hears its subjects and has registered

    async def check(self) -> Check:
        return await self.agent.check()

    async def _publish(self, report: GatewayReport) -> None:
        """Through its site's relay if it has one and it answers (a wave report), else itself."""
        bus = self.runtime.bus
        assert bus is not None  # publishing follows the bucket: connected
        site = self.agent.settings.site
        if site is not None and report.kind in BATCHED_REPORT_KINDS:
            why_not = await send_via_relay(bus.nc, site, report,
                                           self.agent.settings.relay_timeout_s)  # fmt: skip
            if why_not is None:
                return
            log.info("%s report sent itself: %s", report.kind, why_not)
        await bus.publish(report_event(report))

    async def _read_cohort(self, cohort: int) -> CohortState | None:
        kv = await self.runtime.key_value(COHORT_BUCKET)
        if kv is None:
            return None
        try:
            entry = await kv.get(cohort_key(cohort))
        except nats.js.errors.KeyNotFoundError:
            return None
        return CohortState.model_validate_json(entry.value or b"{}")

    async def _on_cohort(self, msg: Msg) -> None:
        """Its cohort's new state (a notification): act on it in the background."""
        if (state := heard_cohort_state(msg)) is not None:
            parent = extract_trace_context(dict(msg.headers or {}))
            self._spawn(self._apply_cohort(state, parent))

    async def _apply_cohort(self, state: CohortState, parent: Context | None = None) -> None:
        async def act() -> GatewayReport | None:
            return await self.agent.apply_cohort(state)

        def failed() -> None:
            self.agent.forget_entry()  # its report did not go out: act (and report) again

        await self._act(COHORT_EVENT, parent, f"cohort state {state.generation}", act,
                        superseded=lambda: self.agent.cohort_generation > state.generation,
                        failed=failed)  # fmt: skip

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_assignment(self, msg: Msg) -> None:
        """Its own assignment, heard as it is stored: act on it in the background."""
        if (assignment := heard_assignment(msg)) is not None:
            parent = extract_trace_context(dict(msg.headers or {}))
            self._spawn(self._apply_assignment(assignment, parent))

    async def _apply_assignment(
        self, assignment: GatewayAssignment, parent: Context | None
    ) -> None:
        async def act() -> GatewayReport | None:
            return await self.agent.apply(assignment)

        await self._act(
            GatewayAssignment.event_type, parent, f"assignment {assignment.generation}", act,
            superseded=lambda: self.agent.generation > assignment.generation,
        )  # fmt: skip

    async def _act(
        self, event_type: str, parent: Context | None, what: str,
        act: Callable[[], Awaitable[GatewayReport | None]], *,
        superseded: Callable[[], bool], failed: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Act on what it heard, as a consumer span under its producer's, and publish the
        report; the registry or store away: again with backoff, until a newer one came."""
        tracer = self.runtime.bus.tracer if self.runtime.bus is not None else None
        with (tracer.start_as_current_span(f"process {event_type}", context=parent,
                                           kind=SpanKind.CONSUMER)
              if tracer is not None else contextlib.nullcontext()):  # fmt: skip
            pause_s = 1.0
            while True:
                try:
                    if (report := await act()) is not None:
                        await self._publish(report)
                    return
                except Exception as exc:
                    if failed is not None:
                        failed()
                    log.warning("acting on %s failed (%r); retrying", what, exc)
                await asyncio.sleep(pause_s)
                pause_s = min(2 * pause_s, 30.0)
                if superseded():
                    return  # a newer one came meanwhile: that one acts

    async def _reconcile(self) -> None:
        """Read the desired state and act on it, until that worked once."""
        while (kv := await self.runtime.key_value(DESIRED_BUCKET)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        while True:
            try:
                report = await self.agent.reconcile(kv, self._read_cohort)
                if report is not None:
                    await self._publish(report)
                return
            except Exception as exc:  # the registry or store is away: try again shortly
                log.warning("reconcile failed (%s); retrying", exc)
                await asyncio.sleep(2.0)

    async def _hear_own_subjects(self, bus: Bus) -> None:
        """Subscribe to its cohort's and its own assignment subject (before reading the
        desired state: nothing is missed); reconcile after every reconnect; remove the durable
        consumer an older release of it used."""
        gateway_id = self.agent.settings.gateway_id
        await bus.nc.subscribe(f"{COHORT_SUBJECT}.{cohort_key(self.agent.cohort)}",
                               cb=self._on_cohort)  # fmt: skip
        await bus.nc.subscribe(f"{ASSIGNMENT_SUBJECT}.{gateway_id}", cb=self._on_assignment)
        bus.on_reconnect.append(self._reconcile)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await bus.js.delete_consumer(ROLLOUT.name, durable_name(f"gateway-{gateway_id}",
                                                                   ROLLOUT.name))  # fmt: skip

    async def run(self) -> None:
        # The runtime connects in the background and retries: poll until the bucket exists.
        while await self.runtime.key_value(DESIRED_BUCKET) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self.agent.publish = self._publish
        bus = self.runtime.bus
        assert bus is not None
        if self.agent.settings.cohort_protocol:
            await self._hear_own_subjects(bus)
        await self._publish(self.agent.registration())
        self.registered.set()
        await self._reconcile()
        while True:
            await asyncio.sleep(self.agent.settings.health_interval_s)
            if (report := self.agent.health_report()) is not None:
                await self._publish(report)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    registry = RegistryClient.with_identity(
        settings.registry_url, settings.platform, f"gateway-{settings.gateway_id}"
    )
    agent = Agent(settings, registry, generation_file=settings.model_dir / "generation")
    agent.generation = agent.remembered_generation()
    agent.cohort_generation = agent.remembered_cohort_generation()
    if settings.trust_root_file is not None:
        agent.trust = TrustClient(
            settings.trust_root_file, settings.model_dir / "trust", settings.registry_url,
            auth=registry.auth, refresh_interval_s=settings.trust_refresh_s,
        )  # fmt: skip
    # its own durable consumer only without the cohort protocol (AgentLoop says why)
    handlers = Handlers() if settings.cohort_protocol else build_handlers(agent)
    runtime = ServiceRuntime(
        "gateway", settings, handlers, uses_object_store=False,
        consumer_name=f"gateway-{settings.gateway_id}", identity=f"gateway-{settings.gateway_id}",
        buckets=(DESIRED_BUCKET, COHORT_BUCKET),
    )  # fmt: skip
    loop = AgentLoop(agent, runtime)
    runtime.add_dependency("agent", loop)
    pool = GenerationPool(settings.max_concurrent_generations, settings.queue_timeout_s)
    runtime.add_dependency("generation", pool)  # /readyz shows its load; stopping cancels runs
    register_metrics(runtime.metrics, agent.health)
    app = create_service_app(runtime, router, openai_router, title="slmops gateway")
    app.state.agent = agent
    app.state.agent_loop = loop
    app.state.generation_pool = pool
    return app


def main() -> None:
    settings = GatewaySettings()
    serve(create_app(settings), settings)
