"""Rollouts: the list, one rollout live (server-sent events), and the operators' actions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from slmops_console.live import ANY_ROLLOUT, LiveFeed
from slmops_console.rendering import TEMPLATES, FeedDep, SettingsDep, UpstreamDep, render
from slmops_console.session import Acting, Session, SignedIn
from slmops_console.upstream import Upstream, UpstreamError

router = APIRouter(include_in_schema=False)

#: The actions of the rollout API and the states each applies to (the API decides; this
#: only keeps buttons that would be refused off the page).
ACTIONS = {
    "pause": {"running"},
    "resume": {"paused"},
    "approve": {"running", "paused"},
    "rollback": {"running", "paused", "completed"},
    "cancel": {"waiting", "running", "paused"},
}


def _actions(rollout: dict[str, Any]) -> list[str]:
    return [action for action, states in ACTIONS.items() if rollout["status"] in states]


def _context(rollout: dict[str, Any]) -> dict[str, Any]:
    return {"rollout": rollout, "actions": _actions(rollout), "rendered_at": time.time()}


@router.get("/rollouts", response_class=HTMLResponse)
async def rollouts(request: Request, session: SignedIn, upstream: UpstreamDep) -> HTMLResponse:
    found = await upstream.get("rollout", "/v1/rollouts", session)
    return render(request, "rollouts.html", session, nav="rollouts", rollouts=found)


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
async def rollout(
    rollout_id: str, request: Request, session: SignedIn, upstream: UpstreamDep, error: str = ""
) -> HTMLResponse:
    found = await upstream.get("rollout", f"/v1/rollouts/{rollout_id}", session)
    return render(request, "rollout.html", session, nav="rollouts", error=error, **_context(found))


async def _progress_events(
    rollout_id: str,
    session: Session,
    upstream: Upstream,
    feed: LiveFeed,
    interval_s: float,
    refresh_s: float,
    request: Request,
) -> AsyncIterator[str]:
    """``progress`` events: the rollout's progress fragment whenever its events move it."""
    seen = feed.versions.get(rollout_id, 0)
    any_seen = feed.versions.get(ANY_ROLLOUT, 0)
    while not await request.is_disconnected():
        seen = await feed.changed(rollout_id, seen, refresh_s)
        any_seen = feed.versions.get(ANY_ROLLOUT, any_seen)
        try:
            found = await upstream.get("rollout", f"/v1/rollouts/{rollout_id}", session)
        except UpstreamError as exc:
            yield f"event: problem\ndata: {exc.detail}\n\n"
            if exc.status in (401, 403, 404):
                return  # signed out, revoked or gone: nothing more to show
            await asyncio.sleep(refresh_s)
            continue
        html = TEMPLATES.get_template("_rollout_progress.html").render(
            session=session, **_context(found)
        )
        yield "event: progress\n" + "".join(f"data: {line}\n" for line in html.splitlines())
        yield "\n"
        await asyncio.sleep(interval_s)  # a burst of reports becomes one update


@router.get("/rollouts/{rollout_id}/live")
async def live(
    rollout_id: str,
    request: Request,
    session: SignedIn,
    upstream: UpstreamDep,
    feed: FeedDep,
    settings: SettingsDep,
) -> StreamingResponse:
    await upstream.get("rollout", f"/v1/rollouts/{rollout_id}", session)  # 404s before streaming
    events = _progress_events(
        rollout_id,
        session,
        upstream,
        feed,
        settings.live_interval_s,
        settings.live_refresh_s,
        request,
    )
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post("/rollouts/{rollout_id}/{action}")
async def act(rollout_id: str, action: str, session: Acting, upstream: UpstreamDep) -> Response:
    if action not in ACTIONS:
        raise HTTPException(404, f"no action {action!r}")
    if not session.can_operate:
        raise HTTPException(
            403,
            f"{session.principal.subject} may look but not {action}: "
            "acting on rollouts needs an operator's token",
        )
    target = f"/rollouts/{rollout_id}"
    try:
        await upstream.post(
            "rollout",
            f"/v1/rollouts/{rollout_id}/{action}",
            session,
            {"reason": "from the console"},
        )
    except UpstreamError as exc:
        if exc.status != 409:
            raise
        return RedirectResponse(f"{target}?{urlencode({'error': exc.detail})}", status_code=303)
    return RedirectResponse(target, status_code=303)
