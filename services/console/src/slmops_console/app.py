"""Wiring of the console: the only module that touches FastAPI, NATS and the templates together."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmops.service import ServiceRuntime, create_service_app, serve
from slmops_console.live import LiveFeed
from slmops_console.pages import field, fleet, models, proposals, rollouts, signin, traces
from slmops_console.rendering import STATIC_DIR, render
from slmops_console.session import CsrfRejected, LoginRequired, Sessions
from slmops_console.settings import ConsoleSettings
from slmops_console.upstream import Upstream, UpstreamError

#: Everything the pages load comes from the console itself (the charts and htmx are vendored).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_MACHINE_PATHS = ("/v1/", "/healthz", "/readyz", "/metrics", "/static/")
_HEADLINES = {401: "Signed out", 403: "Not allowed", 404: "Not found", 409: "Refused"}


def _is_page(request: Request) -> bool:
    return not request.url.path.startswith(_MACHINE_PATHS)


def _wants_redirect(request: Request) -> bool:
    """A browser navigating (not htmx, not an event stream): send it to the sign-in page."""
    return not request.headers.get("hx-request") and "text/event-stream" not in request.headers.get(
        "accept", ""
    )


def _to_login(request: Request, reason: str) -> Response:
    if not _wants_redirect(request):
        return Response(reason, status_code=401, headers={"HX-Redirect": "/login"})
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/login?" + urlencode({"next": here, "reason": reason}), 303)


def _problem(request: Request, status: int, detail: str) -> Response:
    return render(
        request,
        "error.html",
        None,
        status_code=status,
        status=status,
        headline=_HEADLINES.get(status, "The platform did not answer"),
        detail=detail,
    )


def create_app(settings: ConsoleSettings | None = None) -> FastAPI:
    settings = settings or ConsoleSettings()
    runtime = ServiceRuntime("console", settings, uses_object_store=False, buckets=())
    feed = LiveFeed(runtime)
    runtime.add_dependency("live_feed", feed)
    app = create_service_app(
        runtime,
        signin.router,
        models.router,
        rollouts.router,
        fleet.router,
        field.router,
        proposals.router,
        traces.router,
        title="slmops console",
    )
    app.state.settings = settings
    app.state.feed = feed
    app.state.upstream = Upstream(settings)
    app.state.sessions = Sessions(app.state.token_verifier, secure=settings.cookie_secure)
    app.state.variant_names = fleet.VariantNames()
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/models", status_code=303)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        return _to_login(request, str(exc))

    @app.exception_handler(CsrfRejected)
    async def csrf_rejected(request: Request, exc: CsrfRejected) -> Response:
        return _problem(request, 403, str(exc))

    @app.exception_handler(UpstreamError)
    async def upstream_error(request: Request, exc: UpstreamError) -> Response:
        if exc.status == 401:
            return _to_login(request, f"signed out: {exc.detail}")
        status = exc.status if exc.status in _HEADLINES else 502
        return _problem(request, status, f"{exc.service}: {exc.detail}")

    @app.exception_handler(StarletteHTTPException)
    async def page_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_page(request) and exc.status_code != 405:
            return _problem(request, exc.status_code, str(exc.detail))
        return await http_exception_handler(request, exc)

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.on_event("shutdown")
    async def close_upstream() -> None:
        await app.state.upstream.close()

    return app


def main() -> None:
    settings = ConsoleSettings()
    serve(create_app(settings), settings)
