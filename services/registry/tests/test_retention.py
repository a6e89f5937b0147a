"""Garbage collection of blobs no manifest or lineage refers to."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from slmops.chunking import ChunkManifest
from slmops.objectstore import blob_key
from slmops_registry.retention import MIN_AGE_FLOOR_S, GcReport
from slmops_registry.testing import RegistryUnderTest, gguf_bytes, published_parent, variant_body

pytestmark = pytest.mark.integration


async def gc_a_week_later(registry: RegistryUnderTest, *, dry_run: bool = True) -> GcReport:
    """The registry's collection as its API runs it, with the clock 8 days on (past the 7-day
    default minimum age; the API itself has no clock to turn)."""
    return await registry.context.collect_garbage(
        min_age_s=registry.settings.gc_min_age_s, dry_run=dry_run,
        now=datetime.now(UTC) + timedelta(days=8),
    )  # fmt: skip


async def test_gc_is_dry_run_by_default_and_then_deletes_only_unreferenced_blobs(
    registry: RegistryUnderTest,
) -> None:
    kept = (await registry.upload(gguf_bytes(tensor_count=1))).json()["digest"]
    orphan = (await registry.upload(gguf_bytes(tensor_count=5))).json()["digest"]
    published = await registry.publish(kept)
    manifest_digest = published.json()["digest"]

    dry = await gc_a_week_later(registry)
    blobs_after_dry = {b.digest for b in registry.context.store.list_blobs()}
    real = await gc_a_week_later(registry, dry_run=False)
    blobs_after = {b.digest for b in registry.context.store.list_blobs()}

    assert dry.dry_run is True
    assert [c.key for c in dry.candidates] == [f"blobs/sha256/{orphan[7:]}"]
    assert dry.deleted == 0
    assert blobs_after_dry == {kept, orphan}
    assert real.deleted == 1
    assert blobs_after == {kept}
    manifest = await registry.client.get(f"/v1/manifests/{manifest_digest}")
    assert manifest.status_code == 200


async def test_gc_spares_recent_blobs(registry: RegistryUnderTest) -> None:
    await registry.upload(gguf_bytes(tensor_count=7))  # referenced by nothing, but new

    report = (await registry.client.post("/v1/admin/gc", params={"dry_run": False})).json()

    assert report["candidates"] == []
    assert len(list(registry.context.store.list_blobs())) == 1


async def test_gc_keeps_everything_a_released_variant_needs(registry: RegistryUnderTest) -> None:
    # setup: a published model, a chunked variant of it with a signed report, an orphan blob
    parent = await published_parent(registry)
    payload = random.Random(7).randbytes(3 * 1024 * 1024)  # above chunk_min_mb: chunked
    artifact = (await registry.upload(gguf_bytes(padding=payload))).json()["digest"]
    body = variant_body(parent, artifact)
    stored = await registry.client.post("/v1/variants", json=body)
    assert stored.status_code == 201
    variant = stored.json()
    report_blob = (await registry.upload(b'{"verdict": "passed", "gates": []}')).json()["digest"]
    added = await registry.client.post(f"/v1/variants/{body['variant_id']}/reports", json={
        "report_digest": report_blob, "verdict": "passed",
        "variant_manifest_digest": variant["digest"], "artifact_digest": artifact,
    })  # fmt: skip
    assert added.status_code == 201, added.text
    orphan = (await registry.upload(gguf_bytes(padding=b"orphan"))).json()["digest"]
    store = registry.context.store
    chunks = ChunkManifest.from_json(
        store.get_bytes(blob_key(variant["manifest"]["chunks_digest"]))
    )
    assert len(chunks.chunks) > 1
    before = {o.key for o in store.list_objects("")}

    # execute: a real collection, every object a week old
    report = await gc_a_week_later(registry, dry_run=False)

    # assert: only the orphan went; the report and every chunk still serve a gateway
    after = {o.key for o in store.list_objects("")}
    assert before - after == {blob_key(orphan)}
    assert report.deleted == 1
    served = await registry.client.get(f"/v1/variants/{body['variant_id']}/report")
    assert served.status_code == 200
    assert served.json()["manifest"]["manifest"]["artifact"]["digest"] == report_blob
    urls = await registry.client.post(
        "/v1/blobs/urls", json={"digests": [c.digest for c in chunks.chunks]}
    )
    assert urls.status_code == 200, urls.text


async def test_no_caller_can_lower_the_minimum_age_below_a_day(
    registry: RegistryUnderTest,
) -> None:
    orphan = (await registry.upload(gguf_bytes(tensor_count=9))).json()["digest"]
    for min_age_s in (0, 3600, MIN_AGE_FLOOR_S - 1):
        refused = await registry.client.post(
            "/v1/admin/gc", params={"min_age_s": min_age_s, "dry_run": False}
        )
        assert refused.status_code == 422
        assert "below the floor of 86400 s" in refused.json()["detail"]
    assert orphan in {b.digest for b in registry.context.store.list_blobs()}
