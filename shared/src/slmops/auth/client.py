"""The calling side: an httpx auth that sends the bearer token kept in a file.

The file is read again when it changes (tokens are re-minted or rotated while clients run);
its content never appears in a log or an error message.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import httpx

from slmops.auth.watched import WatchedFile


class MissingTokenError(Exception):
    pass


class BearerTokenFile(httpx.Auth):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = WatchedFile(path, str.strip)

    def token(self) -> str:
        token = self._file.read()
        if token is None:
            raise MissingTokenError(
                f"no credentials at {self.path}: start the local stack (`slmops up`) or set "
                "SLMOPS_AUTH_TOKEN_FILE to a token file"
            )
        return token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        yield request


class BearerToken(httpx.Auth):
    """A token held in memory (tests, one-off calls)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request
