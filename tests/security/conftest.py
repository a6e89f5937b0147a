"""The attack suite's target: the local stack as processes (`slmops up`): NATS with its users
and permissions, the registry behind its tokens. Each test attacks with one principal's real
credentials and checks, as the admin, that nothing changed.

One stack serves the attack modules (each start costs seconds): every test attacks with
principals, names and generations of its own, so their order decides nothing. A test that
replays the whole bus (the registry's lineage rebuild) keeps a stack of its own
(the ``attack_target`` fixture starts one): the others' forged assignments and reports would
be in its replay."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from slmops.bus.credentials import NatsCredentials
from slmops.testing.attacks import BusPrincipal, connect_as, local_user
from slmops.testing.localstack import RunningStack, local_stack

Connect = Callable[..., Awaitable[BusPrincipal]]


@contextlib.contextmanager
def _attack_target(folder: Path) -> Iterator[RunningStack]:
    with local_stack(folder, SLMOPS_STACK_SERVICES="registry,gateway") as running:
        yield running


@pytest.fixture(scope="session")
def attack_target() -> Callable[[Path], contextlib.AbstractContextManager[RunningStack]]:
    """``with attack_target(folder) as stack``: a stack as the suite attacks it (NATS, S3, the
    registry and a gateway agent), for a module that needs one of its own."""
    return _attack_target


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with _attack_target(tmp_path_factory.mktemp("security")) as running:
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


@pytest.fixture
def generation_base() -> int:
    """A generation above every one an earlier test sent the stack's gateway (it ignores older
    ones as replays, cohort states and its own assignments alike): microseconds now, to which
    a test adds less than 1,000,000."""
    return time.time_ns() // 1_000
