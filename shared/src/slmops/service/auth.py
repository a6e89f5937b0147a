"""Every route's credentials check, as FastAPI dependencies.

A route declares what it accepts: ``Annotated[Principal, Depends(require(Scope.PUBLISH))]``
(or ``dependencies=[Depends(require(...))]`` on a router). A missing or invalid token is a
401 with ``WWW-Authenticate: Bearer``; a valid token without an accepted scope is a 403 naming
the scopes the route wants. Health and readiness are the only routes without a check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from slmops.auth import NoKeysError, Principal, Scope, TokenError, TokenVerifier

_bearer = HTTPBearer(auto_error=False, description="A token minted by `slmops auth token`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.token_verifier
    return verifier


async def authenticate(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    verifier: Annotated[TokenVerifier, Depends(_verifier)],
) -> Principal:
    if credentials is None:
        raise HTTPException(401, "credentials required: send Authorization: Bearer <token>",
                            headers=_CHALLENGE)  # fmt: skip
    try:
        return verifier.verify(credentials.credentials)
    except NoKeysError as exc:
        raise HTTPException(503, f"cannot check credentials: {exc}") from None
    except TokenError as exc:
        raise HTTPException(401, str(exc), headers=_CHALLENGE) from None


def require(*accepted: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency letting in a principal holding any of ``accepted``."""
    wanted = frozenset(accepted)

    async def authorized(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.holds_any(wanted):
            raise HTTPException(
                403, f"{principal.subject} may not do this: it needs one of the scopes "
                f"{', '.join(sorted(wanted))}",
            )  # fmt: skip
        return principal

    return authorized


#: The common case: read access, by people, services and the console.
Reader = Annotated[Principal, Depends(require(Scope.READ))]
