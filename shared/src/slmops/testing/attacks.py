"""For attack tests: connect to a stack's NATS as one principal and see what the server refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client

from slmops.auth.bususers import local_bus_users
from slmops.bus.credentials import NatsCredentials

#: What a refused JetStream request looks like to the client: no answer at all.
UNANSWERED = (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.NoRespondersError)


@dataclass
class BusPrincipal:
    """One principal's NATS connection, with the errors the server sent it."""

    client: Client
    errors: list[str] = field(default_factory=list)
    disconnects: int = 0

    async def refused(self, action: Awaitable[object], wait_s: float = 10.0) -> str:
        """Run ``action`` and return the server's permissions violation for it (the server
        answers a forbidden publish or subscription asynchronously: waited for). A forbidden
        request is never answered: it is cancelled once the violation is in."""
        seen = len(self.errors)
        attempt = asyncio.ensure_future(action)
        try:
            for _ in range(int(wait_s / 0.02)):
                found = [e for e in self.errors[seen:] if "permissions violation" in e]
                if found:
                    return found[0]
                if attempt.done():
                    with contextlib.suppress(*UNANSWERED):
                        attempt.result()
                    await self.client.flush()
                await asyncio.sleep(0.02)
        finally:
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, *UNANSWERED):
                await attempt
        raise AssertionError(f"the server refused nothing; errors so far: {self.errors}")

    async def close(self) -> None:
        await self.client.close()


def local_user(var_dir: Path, name: str | None) -> NatsCredentials:
    """The credentials of the local stack's bus user ``name`` (None: anonymous)."""
    if name is None:
        return NatsCredentials()
    return NatsCredentials.from_seed_file(local_bus_users(var_dir).seed_file(name))


async def connect_as(url: str, creds: NatsCredentials, *, reconnect: bool = True) -> BusPrincipal:
    """Connect with ``creds``, recording the errors the server sends."""
    principal = BusPrincipal(client=Client())

    async def on_error(exc: Exception) -> None:
        principal.errors.append(str(exc).lower())

    async def on_disconnect() -> None:
        principal.disconnects += 1

    await principal.client.connect(
        servers=[url], nkeys_seed_str=creds.nkey_seed, inbox_prefix=creds.inbox_prefix,
        error_cb=on_error, disconnected_cb=on_disconnect, allow_reconnect=reconnect,
        max_reconnect_attempts=3 if reconnect else 0, reconnect_time_wait=1, connect_timeout=2,
    )  # fmt: skip
    return principal


async def connect_once_enrolled(
    connect: Callable[..., Awaitable[Any]], creds: NatsCredentials
) -> Any:
    """``connect(creds, reconnect=False)`` once the server lets the user in: it re-reads its
    users on SIGHUP, a moment after enrolment returns (until then it refuses the key: an
    authorization error, or the socket closed mid-handshake)."""
    for _ in range(100):
        try:
            return await connect(creds, reconnect=False)
        except (nats.errors.Error, OSError):
            await asyncio.sleep(0.1)
    raise AssertionError("the enrolled user was never let in")
