"""Wiring of the gateway service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_gateway.api import router
from slmops_gateway.handlers import build_handlers
from slmops_gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    runtime = ServiceRuntime("gateway", settings, build_handlers(), uses_object_store=False)
    return create_service_app(runtime, router, title="slmops gateway")


def main() -> None:
    settings = GatewaySettings()
    serve(create_app(settings), settings)
