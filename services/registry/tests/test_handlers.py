"""Upstream systems publishing model.published themselves, with an object already in the store."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import ArtifactRef, CloudEvent, ModelPublished, ModelRejected, new_event
from slmops.objectstore import BlobRef
from slmops.testing.events import await_events
from slmops_registry.testing import RegistryUnderTest, gguf_bytes

pytestmark = pytest.mark.integration


def upstream_event(digest: str, size_bytes: int) -> CloudEvent[ModelPublished]:
    payload = ModelPublished(
        model_name="smollm2-135m",
        version="2.0.0",
        format="gguf",
        task="text-generation",
        artifact=ArtifactRef(digest=digest, size_bytes=size_bytes, uri="s3://upstream/x"),
    )
    return new_event(payload, source="urn:trainer:nightly")


async def store_directly(registry: RegistryUnderTest, data: bytes) -> BlobRef:
    """What an upstream system does: put the object into the store without the registry."""
    path = registry.settings.platform.var_dir / "upstream.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return await asyncio.to_thread(registry.context.store.put_file, path)


async def events_of(bus: Bus, event_type: str, count: int) -> list[CloudEvent[Any]]:
    return await await_events(bus, event_type, count=count, timeout_s=20)


async def test_upstream_event_for_a_stored_object_is_recorded_and_signed(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    blob = await store_directly(registry, gguf_bytes(padding=b"\x02" * 1000))
    sent = upstream_event(blob.digest, blob.size_bytes)

    await bus.publish(sent)
    upstream, ours = await events_of(bus, ModelPublished.event_type, 2)

    assert upstream.id == sent.id
    assert ours.source == "/slmops/registry"
    assert ours.data.manifest_digest is not None
    assert ours.data.artifact.digest == blob.digest
    manifest = (await registry.client.get("/v1/models/smollm2-135m/2.0.0")).json()
    assert manifest["digest"] == ours.data.manifest_digest
    assert manifest["manifest"]["created_by"] == "urn:trainer:nightly"


async def test_upstream_event_for_a_missing_object_is_rejected_with_the_reason(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    sent = upstream_event("sha256:" + hashlib.sha256(b"not there").hexdigest(), 123)

    await bus.publish(sent)
    (rejected,) = await events_of(bus, ModelRejected.event_type, 1)

    assert rejected.data.rejected_event_id == sent.id
    assert "not in the store" in rejected.data.reason
    assert (await registry.client.get("/v1/models")).json() == []
    runtime = (await registry.client.get("/v1/runtime")).json()
    assert runtime["consumers"][0]["running"] is True
    assert runtime["consumers"][0]["stats"]["dead_lettered"] == 0


async def test_upstream_event_with_a_wrong_size_is_rejected(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    blob = await store_directly(registry, gguf_bytes())

    await bus.publish(upstream_event(blob.digest, blob.size_bytes + 1))
    (rejected,) = await events_of(bus, ModelRejected.event_type, 1)

    expected = f"has {blob.size_bytes} bytes, the event says {blob.size_bytes + 1}"
    assert expected in rejected.data.reason
