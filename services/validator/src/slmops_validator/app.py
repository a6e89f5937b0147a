"""Wiring of the validator service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_validator.api import router
from slmops_validator.handlers import build_handlers
from slmops_validator.settings import ValidatorSettings


def create_app(settings: ValidatorSettings | None = None) -> FastAPI:
    settings = settings or ValidatorSettings()
    runtime = ServiceRuntime("validator", settings, build_handlers(), uses_object_store=True)
    return create_service_app(runtime, router, title="slmops validator")


def main() -> None:
    settings = ValidatorSettings()
    serve(create_app(settings), settings)
