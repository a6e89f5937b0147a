"""Wiring of the registry service: the only module that touches NATS, FastAPI and tracing.

Events are projected one at a time by the runtime's consumers (:mod:`slmops_registry.handlers`),
except gateway reports: :class:`ReportConsumer` folds those in batches on the registry's
durable on the fleet stream.
"""

from __future__ import annotations

import asyncio
import logging

import nats.js.errors
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slmops.bus.batches import BatchConsumer
from slmops.bus.handlers import durable_name
from slmops.bus.permissions import FLEET_RECORDS_BUCKET
from slmops.bus.topology import FLEET, ConsumerSpec
from slmops.service import BackgroundTask, Check, ServiceRuntime, create_service_app, serve
from slmops_registry import field_api, trust_api, variant_api
from slmops_registry.api import router
from slmops_registry.context import RegistryContext
from slmops_registry.declared import Declaration, Declarations, declaration_of
from slmops_registry.errors import RegistryError
from slmops_registry.handlers import build_handlers
from slmops_registry.reports import REPORT_SUBJECTS, ReportFolder, decode_report
from slmops_registry.settings import RegistrySettings
from slmops_registry.signing import load_signer

log = logging.getLogger(__name__)


def report_consumer_spec(settings: RegistrySettings) -> ConsumerSpec:
    """The registry's durable on the fleet stream (the one its bus permissions allow there):
    applied and failed reports only, a few batches in flight."""
    consumer = settings.consumer
    return ConsumerSpec(
        stream=FLEET.name, durable=durable_name("registry", FLEET.name),
        filter_subjects=REPORT_SUBJECTS, ack_wait_s=consumer.ack_wait_s,
        max_deliver=consumer.max_deliver, max_ack_pending=max(1000, 4 * consumer.fetch_batch),
        description=f"registry: {', '.join(REPORT_SUBJECTS)} (folded in batches)",
    )  # fmt: skip


class ReportConsumer(BackgroundTask):
    """Gateway reports into the lineage, a batch at a time, once NATS and the index are up."""

    task_name = "gateway reports"

    def __init__(self, runtime: ServiceRuntime, context: RegistryContext) -> None:
        super().__init__()
        self.runtime, self.context = runtime, context
        self.consumer: BatchConsumer | None = None
        self.last_error = ""
        runtime.metrics.add_refresher("report consumer lag", self._lag, min_interval_s=1.0)

    async def check(self) -> Check:
        if self.consumer is None or not self.consumer.running:
            reason = "not consuming yet"
            return Check(False, f"{reason}: {self.last_error}" if self.last_error else reason)
        stats = self.consumer.stats
        return Check(True, f"{stats.handled} reports folded in {stats.batches} batches")

    async def run(self) -> None:
        while True:  # NATS away at start: try again (readiness says why meanwhile)
            try:
                if await self._start_folding():
                    return
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("registry: gateway reports not consumed yet: %s", self.last_error)
            await asyncio.sleep(0.2)

    async def _start_folding(self) -> bool:
        """Start the consumer once connected and the index is there; False: not yet."""
        bus, store = self.runtime.bus, await self.context.lineage()
        if bus is None or store is None:
            return False
        spec = report_consumer_spec(self.context.settings)
        await bus.declare_consumer(spec)
        folder = ReportFolder(store, Declarations(self._fleet_record))
        self.consumer = BatchConsumer(
            bus, spec, folder.fold, self.context.settings.consumer,
            observer=self.runtime.metrics, decode=decode_report,
        )  # fmt: skip
        await self.consumer.start()
        self.last_error = ""
        return True

    async def _fleet_record(self, gateway_id: str) -> Declaration | None:
        """A gateway's class and labels as the rollout service's fleet record holds them."""
        kv = await self.runtime.key_value(FLEET_RECORDS_BUCKET)
        if kv is None:
            return None
        try:
            entry = await kv.get(gateway_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return declaration_of(entry.value or b"")

    async def _lag(self) -> None:
        """Its consumer's lag (the runtime reports only the consumers it runs itself)."""
        await self.runtime.report_lag(self.consumer.spec if self.consumer else None)

    async def stop(self) -> None:
        await super().stop()
        if self.consumer is not None:  # before the runtime closes the bus
            await self.consumer.stop()


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    settings = settings or RegistrySettings()
    context = RegistryContext(settings, load_signer(settings))  # fails fast without a key
    runtime = ServiceRuntime(
        "registry", settings, build_handlers(context.publisher, context.lineage)
    )
    context.runtime = runtime
    runtime.add_batch_consumer(report_consumer_spec(settings))
    reports = ReportConsumer(runtime, context)
    runtime.add_dependency("gateway_reports", reports)
    app = create_service_app(
        runtime, router, variant_api.router, field_api.router, trust_api.router,
        title="slmops registry",
    )  # fmt: skip
    app.state.registry = context
    app.state.reports = reports

    @app.exception_handler(RegistryError)
    async def registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    return app


def main() -> None:
    settings = RegistrySettings()
    serve(create_app(settings), settings)
