"""A registry app in-process, against this test's real nats-server and moto S3."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from slmops.bus import Bus
from slmops.settings import PlatformSettings
from slmops.testing.natsserver import NatsServerProcess
from slmops.testing.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY
from slmops_registry.app import create_app
from slmops_registry.context import RegistryContext
from slmops_registry.settings import RegistrySettings
from slmops_registry.testing import RegistryUnderTest


@pytest.fixture
def registry_settings(
    nats_server: NatsServerProcess, s3_server: str, tmp_path: Path
) -> RegistrySettings:
    platform = PlatformSettings(
        nats_url=nats_server.url,
        s3_endpoint_url=s3_server,
        s3_bucket=f"registry-{uuid.uuid4().hex[:12]}",
        s3_access_key_id=TEST_ACCESS_KEY,
        s3_secret_access_key=TEST_SECRET_KEY,
        var_dir=tmp_path / "var",
    )
    return RegistrySettings(platform=platform, max_upload_mb=32, chunk_min_mb=1)


@pytest.fixture
async def registry(
    registry_settings: RegistrySettings, bus: Bus, everything_auth: httpx.Auth
) -> AsyncIterator[RegistryUnderTest]:
    app = create_app(registry_settings)
    context: RegistryContext = app.state.registry
    async with app.router.lifespan_context(app):
        assert context.runtime is not None
        await context.runtime.wait_started(timeout_s=20)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://registry", auth=everything_auth
        ) as client:
            yield RegistryUnderTest(app, client, context, registry_settings)
