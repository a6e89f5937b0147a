"""Wiring of the registry service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_registry.api import router
from slmops_registry.handlers import build_handlers
from slmops_registry.settings import RegistrySettings


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    settings = settings or RegistrySettings()
    runtime = ServiceRuntime("registry", settings, build_handlers(), uses_object_store=True)
    return create_service_app(runtime, router, title="slmops registry")


def main() -> None:
    settings = RegistrySettings()
    serve(create_app(settings), settings)
