"""The attack suite's target: the local stack as processes (`slmops up`): NATS with its users
and permissions, the registry behind its tokens. Each test attacks with one principal's real
credentials and checks, as the admin, that nothing changed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from slmops.bus.credentials import NatsCredentials
from slmops.testing.attacks import BusPrincipal, connect_as, local_user
from slmops.testing.localstack import RunningStack, local_stack

Connect = Callable[..., Awaitable[BusPrincipal]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("security")
    with local_stack(folder, SLMOPS_STACK_SERVICES="registry,gateway") as running:
        yield running


@pytest.fixture
async def connect(stack: RunningStack) -> AsyncIterator[Connect]:
    """``await connect("gateway-local-gw-1")``: a connection as that bus user (or with the
    credentials given), closed after the test."""
    opened: list[BusPrincipal] = []

    async def open_as(who: str | NatsCredentials | None, **options: bool) -> BusPrincipal:
        creds = who if isinstance(who, NatsCredentials) else local_user(stack.var_dir, who)
        principal = await connect_as(stack.urls["nats"], creds, **options)
        opened.append(principal)
        return principal

    yield open_as
    for principal in opened:
        if not principal.client.is_closed:
            await principal.close()
