"""Garbage collection of blobs no manifest or lineage refers to."""

from __future__ import annotations

import pytest

from slmops_registry.testing import RegistryUnderTest, gguf_bytes

pytestmark = pytest.mark.integration


async def test_gc_is_dry_run_by_default_and_then_deletes_only_unreferenced_blobs(
    registry: RegistryUnderTest,
) -> None:
    kept = (await registry.upload(gguf_bytes(tensor_count=1))).json()["digest"]
    orphan = (await registry.upload(gguf_bytes(tensor_count=5))).json()["digest"]
    published = await registry.publish(kept)
    manifest_digest = published.json()["digest"]

    dry = (await registry.client.post("/v1/admin/gc", params={"min_age_s": 0})).json()
    blobs_after_dry = {b.digest for b in registry.context.store.list_blobs()}
    real = await registry.client.post("/v1/admin/gc", params={"min_age_s": 0, "dry_run": False})
    blobs_after = {b.digest for b in registry.context.store.list_blobs()}

    assert dry["dry_run"] is True
    assert [c["key"] for c in dry["candidates"]] == [f"blobs/sha256/{orphan[7:]}"]
    assert dry["deleted"] == 0
    assert blobs_after_dry == {kept, orphan}
    assert real.json()["deleted"] == 1
    assert blobs_after == {kept}
    manifest = await registry.client.get(f"/v1/manifests/{manifest_digest}")
    assert manifest.status_code == 200


async def test_gc_spares_recent_blobs(registry: RegistryUnderTest) -> None:
    await registry.upload(gguf_bytes(tensor_count=7))  # referenced by nothing, but new

    report = (
        await registry.client.post("/v1/admin/gc", params={"dry_run": False, "min_age_s": 3600})
    ).json()

    assert report["candidates"] == []
    assert len(list(registry.context.store.list_blobs())) == 1
