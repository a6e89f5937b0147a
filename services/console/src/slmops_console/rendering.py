"""Templates (Jinja2, autoescaped) and the dependencies every page shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from slmops_console.live import LiveFeed
from slmops_console.session import Session
from slmops_console.settings import ConsoleSettings
from slmops_console.upstream import Upstream

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
STATIC_DIR = Path(__file__).parent / "static"


def render(
    request: Request, name: str, session: Session | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(
        request, name, {"session": session, **context}, status_code=status_code
    )


def _upstream(request: Request) -> Upstream:
    upstream: Upstream = request.app.state.upstream
    return upstream


def _feed(request: Request) -> LiveFeed:
    feed: LiveFeed = request.app.state.feed
    return feed


def _settings(request: Request) -> ConsoleSettings:
    settings: ConsoleSettings = request.app.state.settings
    return settings


UpstreamDep = Annotated[Upstream, Depends(_upstream)]
FeedDep = Annotated[LiveFeed, Depends(_feed)]
SettingsDep = Annotated[ConsoleSettings, Depends(_settings)]
