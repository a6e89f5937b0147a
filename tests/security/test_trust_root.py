"""The trust root on the running stack: a gateway's pinned root yields the registry's real
manifest key through the registry's own (authenticated) routes; nothing else is served."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from slmops.auth import BearerTokenFile, local_credentials
from slmops.testing.localstack import RunningStack
from slmops.trust import KeyRole
from slmops.trust.client import TrustClient
from slmops.trust.local import pinned_root_file


async def test_a_gateway_believes_the_registry_key_its_pinned_root_vouches_for(
    stack: RunningStack, tmp_path: Path
) -> None:
    registry = stack.urls["registry"]
    token = BearerTokenFile(local_credentials(stack.var_dir).token_file("gateway-local-gw-1"))
    client = TrustClient(pinned_root_file(stack.var_dir), tmp_path / "trust", registry, auth=token)
    keys = await asyncio.to_thread(client.refresh)
    async with httpx.AsyncClient(base_url=registry, auth=token) as http:
        served = (await http.get("/v1/keys")).json()["pem"]
    assert keys.current(KeyRole.MANIFESTS).public_key_pem.strip() == served.strip()


async def test_the_trust_routes_need_credentials_and_serve_no_other_file(
    stack: RunningStack,
) -> None:
    token = BearerTokenFile(local_credentials(stack.var_dir).token_file("gateway-local-gw-1"))
    async with httpx.AsyncClient(base_url=stack.urls["registry"]) as anonymous:
        assert (await anonymous.get("/v1/trust/metadata/root.json")).status_code == 401
    async with httpx.AsyncClient(base_url=stack.urls["registry"], auth=token) as http:
        assert (await http.get("/v1/trust/metadata/root.json")).status_code == 200
        assert (await http.get("/v1/trust/metadata/9.root.json")).status_code == 404
        # The keys folder beside metadata/ holds the repository's private keys.
        for name in ("..%2Fkeys%2Froot.pem", "root.pem", ".root.json"):
            response = await http.get(f"/v1/trust/metadata/{name}")
            assert response.status_code in (404, 422), name
            assert b"PRIVATE KEY" not in response.content
