"""Wiring of the rollout service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from slmops.bus.batches import BatchConsumer, BatchHandler
from slmops.bus.handlers import durable_name
from slmops.bus.permissions import COHORT_BUCKET, DESIRED_STATE_BUCKET
from slmops.bus.topology import FLEET, ConsumerSpec
from slmops.events import GatewayReport, GatewayReports
from slmops.events.registry import decoder_for
from slmops.service import BackgroundTask, Check, ServiceRuntime, create_service_app, serve
from slmops.service.registry_api import RegistryClient
from slmops_rollout import proposal_api
from slmops_rollout.api import router
from slmops_rollout.engine import Engine
from slmops_rollout.fleet import GATEWAYS_BUCKET
from slmops_rollout.handlers import EngineSource, build_handlers, on_gateway_reports
from slmops_rollout.metrics import register as register_metrics
from slmops_rollout.settings import RolloutSettings
from slmops_rollout.steps import tick

log = logging.getLogger(__name__)
decode_report = decoder_for(GatewayReport, GatewayReports)
_MAX_ACK_PENDING = 20_000  # reports in flight to this consumer: a few large batches
_BUCKETS = ("slmops-rollouts", DESIRED_STATE_BUCKET, GATEWAYS_BUCKET, COHORT_BUCKET)


class Ticker(BackgroundTask):
    """Moves running rollouts on every ``tick_s`` (their state is in KV: a restart resumes)."""

    task_name = "rollout ticker"

    def __init__(self, engines: Callable[[], Awaitable[Engine | None]], tick_s: float) -> None:
        super().__init__()
        self.engines, self.tick_s = engines, tick_s
        self.last_error = ""

    async def check(self) -> Check:
        return Check(ok=not self.last_error, detail=self.last_error or "ticking")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pause_s = self.tick_s
        while True:
            await asyncio.sleep(pause_s)
            engine = await self.engines()
            if engine is None:
                continue
            began = loop.time()
            try:
                await tick(engine)
                self.last_error = ""
            except Exception as exc:  # the broker is away: the next tick tries again
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("rollout tick failed: %s", self.last_error)
            # A tick may read a whole wave (counting a new one, finding its unsent rest): tens
            # of ms at 100,000, so ticks never take more than a fifth of the time.
            pause_s = max(self.tick_s, 4 * (loop.time() - began))


REPORT_SUBJECTS = (f"{GatewayReport.event_type}.>", f"{GatewayReports.event_type}.>")


def report_consumer(settings: RolloutSettings) -> ConsumerSpec:
    """Its durable on the fleet stream: every gateway report and sites' batches of them,
    folded in batches."""
    return ConsumerSpec(
        stream=FLEET.name, durable=durable_name("rollout", FLEET.name),
        filter_subjects=REPORT_SUBJECTS, ack_wait_s=settings.consumer.ack_wait_s,
        max_deliver=settings.consumer.max_deliver, max_ack_pending=_MAX_ACK_PENDING,
        description=f"rollout: {', '.join(REPORT_SUBJECTS)} (folded in batches)",
    )  # fmt: skip


class ReportFolding(BackgroundTask):
    """Runs the batched consumer of gateway reports once the engine exists."""

    task_name = "gateway reports"

    def __init__(self, engines: EngineSource, runtime: ServiceRuntime, spec: ConsumerSpec,
                 settings: RolloutSettings, handle: BatchHandler) -> None:  # fmt: skip
        super().__init__()
        self.engines, self.runtime, self.spec, self.settings = engines, runtime, spec, settings
        self.handle = handle
        self.consumer: BatchConsumer | None = None
        self.last_error = ""

    async def check(self) -> Check:
        running = self.consumer is not None and self.consumer.running
        detail = self.last_error or ("folding" if running else "starting")
        return Check(ok=running, detail=detail)

    async def run(self) -> None:
        while self.consumer is None:  # NATS away at start: try again (readiness says why)
            try:
                bus = self.runtime.bus
                if bus is not None and await self.engines() is not None:
                    await bus.declare_consumer(self.spec)
                    self.consumer = BatchConsumer(
                        bus, self.spec, self.handle,
                        self.settings.consumer.model_copy(
                            update={"fetch_batch": self.settings.report_batch}),
                        observer=self.runtime.metrics, decode=decode_report,
                    )  # fmt: skip
                    await self.consumer.start()
                    self.last_error = ""
                    return
            except Exception as exc:
                self.consumer = None
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("rollout: could not start folding reports: %s", self.last_error)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await super().stop()


def create_app(settings: RolloutSettings | None = None) -> FastAPI:
    settings = settings or RolloutSettings()
    signer = settings.assignment_signer()  # fails fast without a key outside local
    runtime: ServiceRuntime | None = None
    engine: Engine | None = None

    creating = asyncio.Lock()

    async def engines() -> Engine | None:
        """The one engine of this process (it holds the rollouts and the fleet in memory)."""
        nonlocal engine
        if engine is not None:
            return engine
        async with creating:  # concurrent first callers must not each build one
            if engine is None and runtime is not None and runtime.bus is not None:
                rollouts, desired, gateways, cohorts = [
                    await runtime.key_value(b) for b in _BUCKETS
                ]
                if rollouts is None or desired is None or gateways is None or cohorts is None:
                    return None  # not declared yet
                engine = Engine(runtime.bus, rollouts, desired, gateways, app.state.registry,
                                signer, cohorts)  # fmt: skip
        return engine

    runtime = ServiceRuntime(
        "rollout", settings, build_handlers(engines, settings), uses_object_store=True
    )
    runtime.add_dependency("ticker", Ticker(engines, settings.tick_s))
    counting = register_metrics(runtime.metrics, engines)
    fold = counting(functools.partial(on_gateway_reports, engines=engines))
    reports = runtime.add_batch_consumer(report_consumer(settings))
    runtime.add_dependency("reports", ReportFolding(engines, runtime, reports, settings, fold))
    app = create_service_app(runtime, router, proposal_api.router, title="slmops rollout")
    app.state.engines = engines
    app.state.registry = RegistryClient.with_identity(  # tests may swap it before start
        settings.registry_url, settings.platform, "service-rollout"
    )
    return app


def main() -> None:
    settings = RolloutSettings()
    serve(create_app(settings), settings)
