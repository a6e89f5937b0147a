"""Sign in with a token, sign out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from slmops.auth import TokenError
from slmops_console.rendering import render
from slmops_console.session import Acting, FormDep, SessionsDep

router = APIRouter(include_in_schema=False)


def _local_path(target: str) -> str:
    """Only paths of this console: never an open redirect to another site."""
    local = target.startswith("/") and not target.startswith(("//", "/\\"))
    return target if local else "/models"


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/models", reason: str = "") -> Response:
    return render(request, "login.html", None, next=_local_path(next), reason=reason)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, sessions: SessionsDep, form: FormDep) -> Response:
    target = _local_path(form.get("next", "/models"))
    sessions.check_origin(request)  # another site may not sign a browser in (with its token)
    try:
        session = sessions.open(form.get("token", "").strip())
    except TokenError as exc:
        return render(
            request,
            "login.html",
            None,
            status_code=401,
            next=target,
            reason=f"not signed in: {exc}",
        )
    response = RedirectResponse(target, status_code=303)
    sessions.remember(response, session)
    return response


@router.post("/logout")
async def logout(_: Acting, sessions: SessionsDep) -> Response:
    response = RedirectResponse("/login?reason=signed+out", status_code=303)
    sessions.forget(response)
    return response
