"""Wiring of the rollout service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_rollout.api import router
from slmops_rollout.handlers import build_handlers
from slmops_rollout.settings import RolloutSettings


def create_app(settings: RolloutSettings | None = None) -> FastAPI:
    settings = settings or RolloutSettings()
    runtime = ServiceRuntime("rollout", settings, build_handlers(), uses_object_store=True)
    return create_service_app(runtime, router, title="slmops rollout")


def main() -> None:
    settings = RolloutSettings()
    serve(create_app(settings), settings)
