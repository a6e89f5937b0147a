"""The registry's HTTP API as the services use it (async): one client for every service.

The registry owns manifests and signatures; services upload bytes to the shared
content-addressed store and ask the registry to record a variant or a validation report. A
registry that is down or answers 5xx is a transient fault (the event is retried); a 4xx is a
permanent one.
"""

from __future__ import annotations

from typing import Any

import httpx

from slmops.auth import BearerTokenFile, MissingTokenError
from slmops.events import PermanentError, TransientError
from slmops.settings import PlatformSettings

_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class RegistryClient:
    def __init__(
        self, base_url: str, client: httpx.AsyncClient | None = None,
        auth: httpx.Auth | None = None,
    ) -> None:  # fmt: skip
        """``auth`` is the calling service's credentials (``BearerTokenFile``)."""
        self.auth = auth
        self._client = client or httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=_TIMEOUT, auth=auth
        )

    @classmethod
    def with_identity(
        cls, base_url: str, platform: PlatformSettings, local_name: str
    ) -> RegistryClient:
        """A client sending this process's token (``SLMOPS_AUTH_TOKEN_FILE``, else the local
        stack's token file ``local_name``, e.g. ``service-optimizer``)."""
        return cls(base_url, auth=BearerTokenFile(platform.auth_token_file(local_name)))

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

    async def model_version(self, name: str, version: str) -> dict[str, Any]:
        """The signed manifest of a published model version."""
        response = await self._call("GET", f"/v1/models/{name}/{version}")
        return self._json(response, f"model {name} {version}")

    async def add_report(self, variant_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """Record a validation report (its JSON blob already stored) of a variant."""
        response = await self._call("POST", f"/v1/variants/{variant_id}/reports", json=request)
        return self._json(response, f"report of variant {variant_id}")

    async def manifest(self, digest: str) -> dict[str, Any]:
        """A signed manifest by its digest (parse and verify it before trusting it)."""
        response = await self._call("GET", f"/v1/manifests/{digest}")
        return self._json(response, f"manifest {digest}")

    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        """``{"manifest": signed report manifest, "report": ...}`` of the newest report, or
        None when the variant has none."""
        response = await self._call("GET", f"/v1/variants/{variant_id}/report")
        if response.status_code == 404:
            return None
        return self._json(response, f"report of variant {variant_id}")

    async def variant_field(self, variant_id: str) -> dict[str, Any] | None:
        """The variant's device-measured figures per class (``classes``: each a statement
        signed by the registry and ``measured``, it parsed), or None when the lineage has no
        such variant."""
        response = await self._call("GET", f"/v1/variants/{variant_id}/field")
        if response.status_code == 404:
            return None
        return self._json(response, f"field figures of variant {variant_id}")

    async def download_url(self, digest: str) -> str:
        """A short-lived presigned URL of a blob."""
        response = await self._call("GET", f"/v1/blobs/{digest}/url")
        return str(self._json(response, f"download URL of {digest}")["url"])

    async def download_urls(self, digests: list[str]) -> dict[str, str]:
        """Short-lived presigned URLs of many blobs (e.g. the chunks a gateway lacks)."""
        response = await self._call("POST", "/v1/blobs/urls", json={"digests": digests})
        urls: dict[str, str] = self._json(response, f"{len(digests)} download URLs")["urls"]
        return urls

    async def sign_rollback(self, variant_id: str, rollout_id: str | None) -> tuple[str, int]:
        """The registry's signature allowing gateways to roll back to ``variant_id``, and when
        it expires (unix seconds)."""
        response = await self._call(
            "POST", f"/v1/variants/{variant_id}/rollbacks", json={"rollout_id": rollout_id}
        )
        body = self._json(response, f"rollback to {variant_id}")
        return str(body["signature"]), int(body["expires_at"])

    async def public_key_pem(self) -> str:
        """The public key that verifies the registry's manifest signatures."""
        response = await self._call("GET", "/v1/keys")
        return str(self._json(response, "signing keys")["pem"])

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransientError(f"registry unreachable ({exc!r}); will retry") from exc
        except MissingTokenError as exc:
            raise TransientError(f"{exc}; will retry") from None

    @staticmethod
    def _json(response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code >= 500:
            raise TransientError(f"registry answered {response.status_code} for {what}")
        if response.status_code in (401, 403):  # credentials: fixed by whoever runs us, so retry
            raise TransientError(
                f"registry refused this service's credentials for {what}: "
                f"{response.text[:300]} ({response.status_code}); will retry"
            )
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise PermanentError(f"registry refused {what}: {detail} ({response.status_code})")
        body: dict[str, Any] = response.json()
        return body
