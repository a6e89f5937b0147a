"""Wiring of the rollout service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from slmops.bus.permissions import COHORT_BUCKET, DESIRED_STATE_BUCKET
from slmops.service import BackgroundTask, Check, ServiceRuntime, create_service_app, serve
from slmops.service.registry_api import RegistryClient
from slmops_rollout import proposal_api
from slmops_rollout.api import router
from slmops_rollout.engine import Engine
from slmops_rollout.fleet import GATEWAYS_BUCKET
from slmops_rollout.handlers import build_handlers
from slmops_rollout.metrics import register as register_metrics
from slmops_rollout.settings import RolloutSettings
from slmops_rollout.steps import tick

log = logging.getLogger(__name__)
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
            # A tick reads the whole current wave: on a wave of 100,000 it takes tens of ms,
            # so it never gets more than a fifth of the time the reports need.
            pause_s = max(self.tick_s, 4 * (loop.time() - began))


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
    register_metrics(runtime.metrics, runtime.handlers, engines)
    app = create_service_app(runtime, router, proposal_api.router, title="slmops rollout")
    app.state.engines = engines
    app.state.registry = RegistryClient.with_identity(  # tests may swap it before start
        settings.registry_url, settings.platform, "service-rollout"
    )
    return app


def main() -> None:
    settings = RolloutSettings()
    serve(create_app(settings), settings)
