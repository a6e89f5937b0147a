"""Proposals: releases the field's evidence proposed (a new variant for one class whose field
figures broke its budget), across models, and an operator's approval or rejection.

Approving starts the proposal's rollout (the rollout service's ``/v1/proposals/{id}/approve``);
rejecting needs a reason. The APIs decide who may: the console only keeps the buttons off a
viewer's page and refuses their forged posts itself too."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from slmops_console.pages.fleet import VariantNames
from slmops_console.rendering import UpstreamDep, render
from slmops_console.session import Acting, FormDep, Session, SignedIn
from slmops_console.upstream import Upstream, UpstreamError
from slmops_console.views import proposals as proposals_view

router = APIRouter(include_in_schema=False)
STATUSES = ("pending", "approved", "rejected", "failed")


async def shown(
    found: list[dict[str, Any]], request: Request, session: Session, upstream: Upstream
) -> list[proposals_view.Shown]:
    """Proposals as shown, their variants by name."""
    names: VariantNames = request.app.state.variant_names
    named = await names.names(proposals_view.variant_ids(found), session, upstream)
    return [proposals_view.shown(p, named) for p in found]


@router.get("/proposals", response_class=HTMLResponse)
async def proposals(
    request: Request, session: SignedIn, upstream: UpstreamDep, status: str = "", error: str = ""
) -> HTMLResponse:
    wanted = status if status in STATUSES else None
    found = await upstream.get("rollout", "/v1/proposals", session, status=wanted)
    every = await shown(found, request, session, upstream)
    return render(request, "proposals.html", session, nav="proposals", proposals=every,
                  status=wanted or "", statuses=STATUSES, error=error)  # fmt: skip


@router.get("/proposals/count", response_class=PlainTextResponse)
async def pending_count(session: SignedIn, upstream: UpstreamDep) -> str:
    """The navigation's badge (htmx loads it after the page): nothing when there is nothing
    pending or the rollout service does not answer (the page itself still works)."""
    try:
        found = await upstream.get("rollout", "/v1/proposals", session, status="pending")
    except UpstreamError:
        return ""
    return f"({len(found)} pending)" if found else ""


def _back(form: dict[str, str]) -> str:
    """Where the decision was taken (a page of this console), to return to."""
    back = form.get("back", "")
    parts = urlsplit(back)
    if not back.startswith("/") or back.startswith("//") or parts.scheme or parts.netloc:
        return "/proposals"
    return back


def _with_error(back: str, detail: str) -> str:
    joiner = "&" if "?" in back else "?"
    return f"{back}{joiner}{urlencode({'error': detail})}"


@router.post("/proposals/{release_id}/{decision}")
async def decide(
    release_id: str, decision: str, session: Acting, upstream: UpstreamDep, form: FormDep
) -> Response:
    if decision not in ("approve", "reject"):
        raise HTTPException(404, f"no decision {decision!r}")
    if not session.can_operate:
        raise HTTPException(
            403,
            f"{session.principal.subject} may look but not {decision}: "
            "deciding on proposals needs an operator's token",
        )
    back = _back(form)
    reason = form.get("reason", "").strip()[:500]
    if decision == "reject" and not reason:
        return RedirectResponse(_with_error(back, "a rejection needs a reason"), status_code=303)
    body = {"reason": reason or "approved from the console"}
    try:
        await upstream.post("rollout", f"/v1/proposals/{release_id}/{decision}", session, body)
    except UpstreamError as exc:
        if exc.status not in (409, 422):
            raise
        return RedirectResponse(_with_error(back, exc.detail), status_code=303)
    return RedirectResponse(back, status_code=303)
