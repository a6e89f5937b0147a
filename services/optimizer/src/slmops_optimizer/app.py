"""Wiring of the optimizer service: the only module that touches NATS, FastAPI and tracing
(Ray lives behind ``compute.py``, its single wrapper)."""

from __future__ import annotations

from fastapi import FastAPI

from slmops.profiles import load_profiles
from slmops.service import ServiceRuntime, create_service_app, serve
from slmops.service.registry_api import RegistryClient
from slmops_optimizer.api import router
from slmops_optimizer.compute import Compute
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.handlers import build_handlers
from slmops_optimizer.metrics import register as register_metrics
from slmops_optimizer.settings import OptimizerSettings


def create_app(settings: OptimizerSettings | None = None) -> FastAPI:
    settings = settings or OptimizerSettings()
    context = OptimizerContext(
        settings=settings,
        profiles=load_profiles(settings.profiles_dir),  # fails fast on a bad profile
        compute=Compute(settings),
        registry=RegistryClient.with_identity(
            settings.registry_url, settings.platform, "service-optimizer"
        ),
    )
    runtime = ServiceRuntime("optimizer", settings, build_handlers(context), uses_object_store=True)
    runtime.add_dependency("ray_serve", context.compute)
    context.runtime = runtime
    register_metrics(runtime.metrics, context)
    app = create_service_app(runtime, router, title="slmops optimizer")
    app.state.optimizer = context
    return app


def main() -> None:
    settings = OptimizerSettings()
    serve(create_app(settings), settings)
