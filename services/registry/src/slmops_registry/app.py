"""Wiring of the registry service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_registry import field_api, trust_api, variant_api
from slmops_registry.api import router
from slmops_registry.context import RegistryContext
from slmops_registry.errors import RegistryError
from slmops_registry.handlers import build_handlers
from slmops_registry.settings import RegistrySettings
from slmops_registry.signing import load_signer


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    settings = settings or RegistrySettings()
    context = RegistryContext(settings, load_signer(settings))  # fails fast without a key
    runtime = ServiceRuntime(
        "registry", settings, build_handlers(context.publisher, context.lineage)
    )
    context.runtime = runtime
    app = create_service_app(
        runtime, router, variant_api.router, field_api.router, trust_api.router,
        title="slmops registry",
    )  # fmt: skip
    app.state.registry = context

    @app.exception_handler(RegistryError)
    async def registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    return app


def main() -> None:
    settings = RegistrySettings()
    serve(create_app(settings), settings)
