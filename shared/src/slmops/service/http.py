"""The HTTP side every service shares: liveness, readiness, metrics, app assembly, serving."""

from __future__ import annotations

import logging
from dataclasses import asdict

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from slmops import __version__
from slmops.auth import Scope, TokenVerifier
from slmops.collector import collect_less
from slmops.service.auth import require
from slmops.service.metrics import CONTENT_TYPE, HttpMetricsMiddleware
from slmops.service.runtime import ServiceRuntime
from slmops.settings import ServiceSettings


def health_router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "service": runtime.name, "version": __version__}

    @router.get(
        "/readyz",
        summary="Readiness: NATS connected, topology declared, consumers running, store reachable",
        responses={503: {"description": "Not ready; the body names each failing dependency"}},
    )
    async def readyz() -> JSONResponse:
        report = await runtime.readiness()
        return JSONResponse(report.as_dict(), status_code=200 if report.ready else 503)

    @router.get(
        "/v1/runtime",
        summary="The service's consumers and what they have handled",
        dependencies=[Depends(require(Scope.READ))],
    )
    async def runtime_info() -> dict[str, object]:
        return {
            "service": runtime.name,
            "source": runtime.source,
            "consumers": [
                {
                    "stream": c.spec.stream,
                    "durable": c.spec.durable,
                    "subjects": list(c.spec.filter_subjects),
                    "running": c.running,
                    "stats": asdict(c.stats),
                }
                for c in runtime.consumers
            ],
        }

    return router


def metrics_router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get(
        "/metrics",
        summary="Prometheus metrics of this process (text format 0.0.4)",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "The metric families"}},
        dependencies=[Depends(require(Scope.METRICS))],
    )
    async def metrics() -> Response:
        return Response(await runtime.metrics.render(), media_type=CONTENT_TYPE)

    async def consumer_lag() -> None:
        bus = runtime.bus
        if bus is None or not bus.connected:
            return
        for consumer in runtime.consumers:
            info = await bus.js.consumer_info(consumer.spec.stream, consumer.spec.durable)
            runtime.metrics.consumer_pending.labels(consumer.label).set(info.num_pending or 0)
            runtime.metrics.consumer_ack_pending.labels(consumer.label).set(
                info.num_ack_pending or 0
            )

    runtime.metrics.add_refresher("consumer lag", consumer_lag, min_interval_s=1.0)
    return router


def create_service_app(runtime: ServiceRuntime, *routers: APIRouter, title: str) -> FastAPI:
    """A FastAPI app whose lifespan runs ``runtime``, with health and metrics routes, tracing
    and the token verifier every route's credentials check uses."""
    app = FastAPI(title=title, version=__version__, lifespan=runtime.lifespan)
    app.state.runtime = runtime
    platform = runtime.settings.platform
    app.state.token_verifier = TokenVerifier(
        platform.auth_keys_file(), issuer=platform.auth.issuer, audience=platform.auth.audience
    )
    app.state.metrics = runtime.metrics  # a service adds its domain families to it
    app.include_router(health_router(runtime))
    app.include_router(metrics_router(runtime))
    for router in routers:
        app.include_router(router)
    app.add_middleware(HttpMetricsMiddleware, metrics=runtime.metrics)
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=runtime.tracer_provider, excluded_urls="healthz,readyz"
    )
    return app


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run ``app`` with uvicorn on the service's host and port (127.0.0.1 by default)."""
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    collect_less()  # what the imports and the app built lives as long as the process
    # A connection that never ends (a stream whose client vanished without a FIN) must not hold
    # a stopping service forever: past the consumers' drain time it is cut.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.consumer.drain_timeout_s))  # fmt: skip
