"""The platform's APIs as the console calls them: with the signed-in operator's token.

The console holds no privilege of its own over the platform: each call carries the session's
token, so the APIs decide what this operator may see and do. Errors become
:class:`UpstreamError` (status and reason), which ``app.py`` turns into a page.
"""

from __future__ import annotations

from typing import Any

import httpx

from slmops_console.session import Session
from slmops_console.settings import ConsoleSettings

SERVICES = ("registry", "optimizer", "validator", "rollout", "telemetry")


class UpstreamError(Exception):
    def __init__(self, service: str, status: int, detail: str) -> None:
        super().__init__(f"{service}: {detail}")
        self.service, self.status, self.detail = service, status, detail


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    if isinstance(detail, dict):
        detail = detail.get("message", str(detail))
    return str(detail)[:500] or f"HTTP {response.status_code}"


class Upstream:
    """One HTTP client per platform service (a service whose URL is empty is not configured:
    calling it is an :class:`UpstreamError` the pages put in words)."""

    def __init__(self, settings: ConsoleSettings) -> None:
        urls = {name: getattr(settings, f"{name}_url") for name in SERVICES}
        self._clients = {
            name: httpx.AsyncClient(
                base_url=url, timeout=settings.upstream_timeout_s, trust_env=False
            )
            for name, url in urls.items()
            if url
        }

    def configured(self, service: str) -> bool:
        return service in self._clients

    async def get(self, service: str, path: str, session: Session, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None and v != ""}
        return await self._call(service, "GET", path, session, params=query)

    async def post(self, service: str, path: str, session: Session, body: Any) -> Any:
        return await self._call(service, "POST", path, session, json=body)

    async def _call(
        self, service: str, method: str, path: str, session: Session, **kwargs: Any
    ) -> Any:
        headers = {"Authorization": f"Bearer {session.token}"}
        client = self._clients.get(service)
        if client is None:
            raise UpstreamError(service, 503, f"the console is not configured to reach {service}")
        try:
            response = await client.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise UpstreamError(
                service, 503, f"{service} is unreachable ({type(exc).__name__})"
            ) from None
        if response.status_code >= 400:
            raise UpstreamError(service, response.status_code, _detail(response))
        return response.json()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
