"""Wiring of the optimizer service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_optimizer.api import router
from slmops_optimizer.handlers import build_handlers
from slmops_optimizer.settings import OptimizerSettings


def create_app(settings: OptimizerSettings | None = None) -> FastAPI:
    settings = settings or OptimizerSettings()
    runtime = ServiceRuntime("optimizer", settings, build_handlers(), uses_object_store=True)
    return create_service_app(runtime, router, title="slmops optimizer")


def main() -> None:
    settings = OptimizerSettings()
    serve(create_app(settings), settings)
