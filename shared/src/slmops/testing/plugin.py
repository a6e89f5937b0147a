"""The slmops pytest plugin: real servers per test, started by fixtures.

Installed with the SDK (entry point ``pytest11``), so every service's tests get these fixtures:
``nats_server`` (a real ``nats-server`` with JetStream on a free port and a temp store, one per
test: it starts in ~20 ms, so tests never share broker state), ``bus`` (a connected
:class:`~slmops.bus.Bus` with the topology declared), ``span_exporter`` (in-memory spans),
``s3_server`` / ``object_store`` (moto's threaded S3 server), ``credentials`` (the local
stack's token set minted into the test's ``var/``, plus an ``everything`` token holding every
scope, for tests about something other than authorization), and :func:`await_events`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from slmops.auth import BearerToken, LocalCredentials, Scope, ensure_local_credentials
from slmops.bus.connection import Bus
from slmops.bus.topology import Topology
from slmops.testing.consumers import start_consumer
from slmops.testing.events import await_events, stream_count
from slmops.testing.natsserver import NatsServerProcess
from slmops.testing.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY, object_store, s3_server

__all__ = ["await_events", "object_store", "s3_server", "start_consumer", "stream_count"]
#: Registered with this plugin: a hung asyncio test's tasks, listed before its timeout.
pytest_plugins = ["slmops.testing.hangs"]


def pytest_configure(config: pytest.Config) -> None:
    for marker in (
        "integration: talks to real servers started by fixtures",
        "e2e: the whole pipeline on a real model",
        "fault: kills or restarts processes, the broker or the store mid-work",
        "slow: takes more than a few seconds",
    ):
        config.addinivalue_line("markers", marker)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    server = NatsServerProcess(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def credentials(tmp_path: Path) -> LocalCredentials:
    """Token keys and tokens in ``<tmp_path>/var/auth``, as `slmops up` mints them."""
    creds = ensure_local_credentials(tmp_path / "var")
    creds.mint("everything", "test:everything", frozenset(Scope))
    return creds


@pytest.fixture
def everything_auth(credentials: LocalCredentials) -> BearerToken:
    """httpx auth with every scope: for tests whose subject is not authorization."""
    return BearerToken(credentials.token("everything"))


@pytest.fixture
def platform_env(
    nats_server: NatsServerProcess, s3_server: str, tmp_path: Path, credentials: LocalCredentials
) -> dict[str, str]:
    """``SLMOPS_*`` variables pointing a service process at this test's NATS, S3 and keys."""
    return service_env_for(nats_server.url, s3_server, tmp_path, credentials)


def service_env_for(
    nats_url: str, s3_server: str, tmp_path: Path, credentials: LocalCredentials
) -> dict[str, str]:
    """``SLMOPS_*`` variables pointing a service process at NATS ``nats_url`` (one server or
    a cluster's nodes), the S3 server (a bucket of its own) and the test's keys."""
    return {
        "SLMOPS_AUTH_KEYS_FILE": str(credentials.keys_file),
        "SLMOPS_ENV": "local",
        "SLMOPS_NATS_URL": nats_url,
        "SLMOPS_S3_ENDPOINT_URL": s3_server,
        "SLMOPS_S3_BUCKET": f"slmops-{uuid.uuid4().hex[:12]}",
        "SLMOPS_S3_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "SLMOPS_S3_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "SLMOPS_VAR_DIR": str(tmp_path / "var"),
    }


@pytest.fixture
def span_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(span_exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    return provider


@pytest.fixture
async def bus(
    nats_server: NatsServerProcess, tracer_provider: TracerProvider
) -> AsyncIterator[Bus]:
    """A connected bus (source ``/slmops/test``) with every stream and KV bucket declared."""
    connected = await Bus.connect(
        nats_server.url, source="/slmops/test", tracer=tracer_provider.get_tracer("test")
    )
    await connected.declare(Topology())
    yield connected
    await connected.close()
