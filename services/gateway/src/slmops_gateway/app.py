"""Wiring of the gateway service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

import asyncio
import logging

import nats.js.errors
from fastapi import FastAPI
from nats.aio.msg import Msg
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from slmops.bus.permissions import COHORT_BUCKET, COHORT_SUBJECT
from slmops.cohorts import COHORT_EVENT, CohortState, cohort_key
from slmops.events import GatewayReport
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
from slmops_gateway.openai_api import router as openai_router
from slmops_gateway.pool import GenerationPool
from slmops_gateway.relay import send_via_relay
from slmops_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class AgentLoop(BackgroundTask):
    """On connect: register, then reconcile with the desired state (a gateway that was offline
    catches up); afterwards report health aggregates every ``health_interval_s``."""

    task_name = "gateway agent"

    def __init__(self, agent: Agent, runtime: ServiceRuntime) -> None:
        super().__init__()
        self.agent, self.runtime = agent, runtime
        self._tasks: set[asyncio.Task[None]] = set()

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
        try:
            state = CohortState.model_validate_json(msg.data)
        except ValidationError as exc:
            log.warning("ignored a malformed cohort state on %s: %s", msg.subject, exc)
            return
        parent = extract_trace_context(dict(msg.headers or {}))
        task = asyncio.create_task(self._apply_cohort(state, parent))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_cohort(self, state: CohortState, parent: Context | None = None) -> None:
        tracer = self.runtime.bus.tracer if self.runtime.bus is not None else None
        if tracer is None:
            await self._apply_cohort_retrying(state)
            return
        with tracer.start_as_current_span(f"process {COHORT_EVENT}", context=parent,
                                          kind=SpanKind.CONSUMER):  # fmt: skip
            await self._apply_cohort_retrying(state)

    async def _apply_cohort_retrying(self, state: CohortState) -> None:
        pause_s = 1.0
        while True:  # the registry or store away: again with backoff, until a newer state
            try:
                if (report := await self.agent.apply_cohort(state)) is not None:
                    await self._publish(report)
                return
            except Exception as exc:
                self.agent.forget_entry()  # its report did not go out: act (and report) again
                log.warning("acting on cohort state %s failed (%r); retrying", state.generation,
                            exc)  # fmt: skip
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, 30.0)
            if self.agent.cohort_generation > state.generation:
                return  # a newer state came meanwhile: that one acts

    async def run(self) -> None:
        # The runtime connects in the background and retries: poll until the bucket exists.
        while (kv := await self.runtime.key_value(DESIRED_BUCKET)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self.agent.publish = self._publish
        bus = self.runtime.bus
        assert bus is not None
        if self.agent.settings.cohort_protocol:  # subscribed before reading: nothing missed
            subject = f"{COHORT_SUBJECT}.{cohort_key(self.agent.cohort)}"
            await bus.nc.subscribe(subject, cb=self._on_cohort)
        await self._publish(self.agent.registration())
        while True:
            try:
                report = await self.agent.reconcile(kv, self._read_cohort)
                if report is not None:
                    await self._publish(report)
                break
            except Exception as exc:  # the registry or store is away: try again shortly
                log.warning("reconcile failed (%s); retrying", exc)
                await asyncio.sleep(2.0)
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
    runtime = ServiceRuntime(
        "gateway", settings, build_handlers(agent), uses_object_store=False,
        consumer_name=f"gateway-{settings.gateway_id}", identity=f"gateway-{settings.gateway_id}",
        buckets=(DESIRED_BUCKET, COHORT_BUCKET),
    )  # fmt: skip
    runtime.add_dependency("agent", AgentLoop(agent, runtime))
    pool = GenerationPool(settings.max_concurrent_generations, settings.queue_timeout_s)
    runtime.add_dependency("generation", pool)  # /readyz shows its load; stopping cancels runs
    register_metrics(runtime.metrics, agent.health)
    app = create_service_app(runtime, router, openai_router, title="slmops gateway")
    app.state.agent = agent
    app.state.generation_pool = pool
    return app


def main() -> None:
    settings = GatewaySettings()
    serve(create_app(settings), settings)
