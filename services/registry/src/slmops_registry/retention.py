"""Garbage collection: delete blobs and manifests nothing refers to, once they are old enough.

What is alive: every published version's manifest (the catalog); every variant and report
manifest the registry signed (its index) and every blob and manifest the lineage names; and
what each of those manifests references - artifact, evaluation set, report blob, the chunk
manifest and *every chunk it lists* (gateways fetch deltas by chunk). Old ``staging/``
leftovers of interrupted uploads go too. A minimum age, never below
:data:`MIN_AGE_FLOOR_S`, protects an upload whose version is being published right now.
Dry-run is the default: it reports, deletes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from slmops.chunking import ChunkManifest
from slmops.manifests import MANIFEST_PREFIX, SignedManifest, manifest_key
from slmops.objectstore import (
    BLOB_PREFIX,
    STAGING_PREFIX,
    ObjectNotFoundError,
    ObjectStore,
    StoredObject,
    blob_key,
)
from slmops_registry.catalog import VersionCatalog
from slmops_registry.projection import LineageStore

#: No caller may ask for a younger minimum age: a day covers any publish in flight.
MIN_AGE_FLOOR_S = 86_400.0


class MinAgeTooLow(ValueError):
    pass


class GcReport(BaseModel):
    dry_run: bool
    min_age_s: float
    live_blobs: int
    candidates: list[StoredObject] = Field(default_factory=list)
    deleted: int = 0

    @property
    def reclaimable_bytes(self) -> int:
        return sum(c.size_bytes for c in self.candidates)

    def to_api(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json"), "reclaimable_bytes": self.reclaimable_bytes}


async def live_digests(
    store: ObjectStore, catalog: VersionCatalog, lineage: LineageStore,
    indexed: Collection[str] = (),
) -> tuple[set[str], set[str]]:  # fmt: skip
    """(blob digests, manifest digests) that something still refers to; ``indexed`` are the
    manifests the registry's own index names (variants and reports)."""
    blobs: set[str] = set()
    manifests: set[str] = set(indexed)
    for record in await catalog.list():
        manifests.add(record.manifest_digest)
        blobs.add(record.artifact_digest)
    for document in await lineage.all_lineages():
        if document.published:
            blobs.add(document.published.artifact.digest)
            manifests.add(document.published.manifest_digest)
        for variant in document.variants.values():
            if variant.artifact:
                blobs.add(variant.artifact.digest)
            if variant.manifest_digest:
                manifests.add(variant.manifest_digest)
            blobs.update(r.report.digest for r in variant.reports if r.report)
    for digest in list(manifests):  # what the manifests themselves reference
        try:
            raw = await asyncio.to_thread(store.get_bytes, manifest_key(digest))
        except ObjectNotFoundError:  # a missing manifest refers to nothing
            continue
        manifest = SignedManifest.from_json(raw).manifest
        blobs.add(manifest.artifact.digest)
        if manifest.eval_set is not None:
            blobs.add(manifest.eval_set.digest)
        for digest_field in (manifest.validation_report_digest, manifest.chunks_digest):
            if digest_field:
                blobs.add(digest_field)
        if manifest.chunks_digest:
            blobs.update(await _chunks_of(store, manifest.chunks_digest))
    return blobs, manifests


async def _chunks_of(store: ObjectStore, chunks_digest: str) -> set[str]:
    try:
        raw = await asyncio.to_thread(store.get_bytes, blob_key(chunks_digest))
    except ObjectNotFoundError:
        return set()
    return {chunk.digest for chunk in ChunkManifest.from_json(raw).chunks}


async def collect_garbage(
    store: ObjectStore,
    catalog: VersionCatalog,
    lineage: LineageStore,
    *,
    min_age_s: float,
    dry_run: bool = True,
    indexed: Collection[str] = (),
    now: datetime | None = None,
) -> GcReport:
    """``now`` is for tests (the API never passes it: a caller cannot age objects)."""
    if min_age_s < MIN_AGE_FLOOR_S:
        raise MinAgeTooLow(
            f"min_age_s={min_age_s:g} is below the floor of {MIN_AGE_FLOOR_S:g} s: garbage "
            "collection never touches objects younger than a day"
        )
    live_blobs, live_manifests = await live_digests(store, catalog, lineage, indexed)
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=min_age_s)

    def dead(obj: StoredObject) -> bool:
        if obj.last_modified > cutoff:
            return False
        if obj.key.startswith(BLOB_PREFIX):
            return "sha256:" + obj.key.removeprefix(BLOB_PREFIX) not in live_blobs
        if obj.key.startswith(MANIFEST_PREFIX):
            hexdigest = obj.key.removeprefix(MANIFEST_PREFIX).removesuffix(".json")
            return "sha256:" + hexdigest not in live_manifests
        return obj.key.startswith(STAGING_PREFIX)

    def scan() -> list[StoredObject]:
        prefixes = (BLOB_PREFIX, MANIFEST_PREFIX, STAGING_PREFIX)
        return [obj for prefix in prefixes for obj in store.list_objects(prefix) if dead(obj)]

    report = GcReport(
        dry_run=dry_run,
        min_age_s=min_age_s,
        live_blobs=len(live_blobs),
        candidates=await asyncio.to_thread(scan),
    )
    if not dry_run:
        for obj in report.candidates:
            await asyncio.to_thread(store.delete_key, obj.key)
            report.deleted += 1
    return report
