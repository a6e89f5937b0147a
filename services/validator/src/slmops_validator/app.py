"""Wiring of the validator service: the only module that touches NATS, FastAPI and tracing."""

from __future__ import annotations

from fastapi import FastAPI

from slmops.profiles import load_profiles
from slmops.service import ServiceRuntime, create_service_app, serve
from slmops.service.registry_api import RegistryClient
from slmops.trust.client import TrustClient
from slmops_validator.api import router
from slmops_validator.context import ValidatorContext
from slmops_validator.handlers import build_handlers
from slmops_validator.metrics import register as register_metrics
from slmops_validator.settings import ValidatorSettings


def create_app(settings: ValidatorSettings | None = None) -> FastAPI:
    settings = settings or ValidatorSettings()
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    context = ValidatorContext(
        settings=settings,
        profiles=load_profiles(settings.profiles_dir),  # fails fast on a bad profile
        registry=RegistryClient.with_identity(
            settings.registry_url, settings.platform, "service-validator"
        ),
    )
    if settings.trust_root_file is not None:
        cache = settings.platform.var_dir / "validator" / "trust"
        context.trust = TrustClient(settings.trust_root_file, cache, settings.registry_url,
                                    auth=context.registry.auth)  # fmt: skip
    runtime = ServiceRuntime("validator", settings, build_handlers(context), uses_object_store=True)
    context.runtime = runtime
    register_metrics(runtime.metrics, context)
    app = create_service_app(runtime, router, title="slmops validator")
    app.state.validator = context
    return app


def main() -> None:
    settings = ValidatorSettings()
    serve(create_app(settings), settings)
