"""Signing in to the console: a token becomes a session cookie; every action carries a CSRF token.

The console keeps no passwords and mints nothing: an operator signs in with a token minted by
`slmops auth token` (the local stack's admin token is ``var/auth/admin.jwt``). The cookie holds
that token, ``HttpOnly`` (no script reads it), ``Secure`` and ``SameSite=Strict``, and lives no
longer than the token; every page calls the APIs with it, so what the APIs refuse (a revoked
token, a missing scope) the console refuses too. A cookie is what an ``EventSource`` can send:
it cannot set an Authorization header.

Every state-changing request must carry the session's CSRF token (a form field or the
``X-CSRF-Token`` header htmx sends), an HMAC of the session's token under a key this process
draws at start, and must not come from another origin. A restarted console asks open pages to
reload before they act.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request, Response

from slmops.auth import Principal, Scope, TokenError, TokenVerifier

SESSION_COOKIE = "slmops_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class LoginRequired(Exception):
    """No valid session: sign in (again)."""


class CsrfRejected(Exception):
    """A state-changing request without this session's CSRF token, or from another origin."""


@dataclass(frozen=True)
class Session:
    principal: Principal
    token: str
    csrf: str

    @property
    def can_operate(self) -> bool:
        return Scope.OPERATE in self.principal.scopes

    @property
    def role(self) -> str:
        if Scope.ADMIN in self.principal.scopes:
            return "admin"
        if Scope.OPERATE in self.principal.scopes:
            return "operator"
        return "publisher" if Scope.PUBLISH in self.principal.scopes else "viewer"


class Sessions:
    """Opens sessions from tokens and cookies; checks CSRF tokens."""

    def __init__(self, verifier: TokenVerifier, *, secure: bool, key: bytes | None = None) -> None:
        self.verifier = verifier
        self.secure = secure
        self._key = key or secrets.token_bytes(32)

    def csrf_for(self, token: str) -> str:
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()

    def open(self, token: str) -> Session:
        """A session for ``token``; :class:`TokenError` if it is not valid now."""
        principal = self.verifier.verify(token)
        if not principal.holds_any(frozenset({Scope.READ})):
            raise TokenError(f"{principal.subject} may not read the platform (no read scope)")
        return Session(principal, token, self.csrf_for(token))

    def from_request(self, request: Request) -> Session:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            raise LoginRequired("sign in to continue")
        try:
            return self.open(token)
        except TokenError as exc:
            raise LoginRequired(f"signed out: {exc}") from None

    def remember(self, response: Response, session: Session) -> None:
        max_age_s = max(1, session.principal.expires_at - int(time.time()))
        response.set_cookie(
            SESSION_COOKIE,
            session.token,
            max_age=max_age_s,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )

    def forget(self, response: Response) -> None:
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=self.secure, httponly=True, samesite="strict"
        )

    @staticmethod
    def check_origin(request: Request) -> None:
        """Raise :class:`CsrfRejected` for a request another site's page sent (browsers name
        the sending origin on every POST)."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin != own:
            raise CsrfRejected(f"a request from {origin} may not act here")

    def check(self, request: Request, session: Session, submitted: str | None) -> None:
        """Raise :class:`CsrfRejected` unless ``submitted`` (or the header) is the session's
        CSRF token and the request comes from the console's own origin."""
        self.check_origin(request)
        offered = request.headers.get(CSRF_HEADER) or submitted or ""
        if not hmac.compare_digest(offered, session.csrf):
            raise CsrfRejected("the form is stale or forged: reload the page and try again")


async def form_fields(request: Request) -> dict[str, str]:
    """A URL-encoded form's fields (first value of each); empty for other bodies."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    parsed = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    return {name: values[0] for name, values in parsed.items()}


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


SessionsDep = Annotated[Sessions, Depends(_sessions)]
FormDep = Annotated[dict[str, str], Depends(form_fields)]


async def signed_in(request: Request, sessions: SessionsDep) -> Session:
    return sessions.from_request(request)


SignedIn = Annotated[Session, Depends(signed_in)]


async def acting(
    request: Request, session: SignedIn, sessions: SessionsDep, form: FormDep
) -> Session:
    """A signed-in session whose request carries its CSRF token (every POST)."""
    sessions.check(request, session, form.get(CSRF_FIELD))
    return session


Acting = Annotated[Session, Depends(acting)]
