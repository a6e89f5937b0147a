"""The calling side: an httpx auth that sends the bearer token kept in a file.

The file is read again when it changes (tokens are re-minted or rotated while clients run);
its content never appears in a log or an error message.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from pathlib import Path

import httpx


class MissingTokenError(Exception):
    pass


class BearerTokenFile(httpx.Auth):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._token = ""

    def token(self) -> str:
        try:
            stat = self.path.stat()
        except OSError:
            raise MissingTokenError(
                f"no credentials at {self.path}: start the local stack (`slmops up`) or set "
                "SLMOPS_AUTH_TOKEN_FILE to a token file"
            ) from None
        stamp = (stat.st_mtime, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._token, self._stamp = self.path.read_text().strip(), stamp
            return self._token

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
