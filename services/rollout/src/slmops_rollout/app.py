"""Wiring of the rollout service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI
from nats.js.kv import KeyValue

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_rollout.api import router
from slmops_rollout.fleet import GATEWAYS_BUCKET
from slmops_rollout.handlers import build_handlers
from slmops_rollout.settings import RolloutSettings


def create_app(settings: RolloutSettings | None = None) -> FastAPI:
    settings = settings or RolloutSettings()
    runtime: ServiceRuntime | None = None

    async def gateways() -> KeyValue | None:
        bus = runtime.bus if runtime else None
        if bus is None or f"kv:{GATEWAYS_BUCKET}" not in bus.declared:
            return None
        return await bus.key_value(GATEWAYS_BUCKET)

    runtime = ServiceRuntime("rollout", settings, build_handlers(gateways), uses_object_store=True)
    app = create_service_app(runtime, router, title="slmops rollout")
    app.state.gateways = gateways
    return app


def main() -> None:
    settings = RolloutSettings()
    serve(create_app(settings), settings)
