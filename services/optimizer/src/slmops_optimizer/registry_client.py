"""The registry's variant API as the optimizer uses it (async HTTP).

The registry owns manifests and signatures; the optimizer only uploads bytes to the shared
content-addressed store and asks the registry to record a variant. A registry that is down or
answers 5xx is a transient fault (the event is retried); a 4xx is a permanent one.
"""

from __future__ import annotations

from typing import Any

import httpx

from slmops.events import PermanentError, TransientError

_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class RegistryClient:
    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=_TIMEOUT)

    async def close(self) -> None:
        await self._client.aclose()

    async def variant(self, variant_id: str) -> dict[str, Any] | None:
        """The signed manifest of a stored variant, or None."""
        response = await self._call("GET", f"/v1/variants/{variant_id}")
        if response.status_code == 404:
            return None
        return self._json(response, f"variant {variant_id}")

    async def register_variant(self, request: dict[str, Any]) -> dict[str, Any]:
        """Record a variant; the same request again returns the manifest stored first."""
        response = await self._call("POST", "/v1/variants", json=request)
        return self._json(response, f"variant {request.get('variant_id')}")

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransientError(f"registry unreachable ({exc!r}); will retry") from exc

    @staticmethod
    def _json(response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code >= 500:
            raise TransientError(f"registry answered {response.status_code} for {what}")
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise PermanentError(f"registry refused {what}: {detail} ({response.status_code})")
        body: dict[str, Any] = response.json()
        return body
