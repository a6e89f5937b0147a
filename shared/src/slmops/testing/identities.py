"""Calling a local stack as the identity each call needs, for tests and benchmarks that play
the services they do not run (a variant stored as the optimizer, a report as the validator, an
event published with the service's own bus identity)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import httpx

from slmops.auth import LocalCredentials
from slmops.bus import Bus
from slmops.events import EventPayload, new_event
from slmops.testing.attacks import local_user


class RegistryRoles(httpx.Auth):
    """Each registry call with the token allowed to make it: storing a variant as the
    optimizer, a report as the validator, everything else as the admin."""

    def __init__(self, creds: LocalCredentials) -> None:
        self.creds = creds

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path, name = request.url.path, "admin"
        if request.method == "POST" and path == "/v1/variants":
            name = "service-optimizer"
        elif request.method == "POST" and path.endswith("/reports"):
            name = "service-validator"
        request.headers["Authorization"] = f"Bearer {self.creds.token(name)}"
        yield request


async def publish_as(nats_url: str, var_dir: Path, service: str, payload: EventPayload) -> None:
    """Publish ``payload`` as ``service`` would: with its own bus identity and source."""
    creds = local_user(var_dir, f"service-{service}")
    bus = await Bus.connect(nats_url, source=f"/slmops/{service}", credentials=creds)
    try:
        await bus.publish(new_event(payload, source=f"/slmops/{service}"))
    finally:
        await bus.close()
