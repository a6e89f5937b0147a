"""What the registry's API and handlers share: settings, store, signer, and the publisher."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from slmops.bus import LINEAGE_KV, VARIANTS_KV
from slmops.objectstore import ObjectStore
from slmops.service import ServiceRuntime
from slmops_registry.catalog import BUCKET, VersionCatalog
from slmops_registry.projection import LineageStore
from slmops_registry.publishing import Publisher
from slmops_registry.rebuild import rebuild
from slmops_registry.retention import GcReport, collect_garbage
from slmops_registry.settings import RegistrySettings
from slmops_registry.signing import RegistrySigner
from slmops_registry.variants import Variants


class MaintenanceBusy(Exception):
    """Another maintenance task (GC, lineage rebuild) is running; try again later."""


@dataclass
class RegistryContext:
    settings: RegistrySettings
    signer: RegistrySigner
    # Set by app.py once the runtime exists (the runtime needs the handlers, which need this).
    runtime: ServiceRuntime | None = None
    _publisher: Publisher | None = field(default=None, init=False)
    _lineage: LineageStore | None = field(default=None, init=False)
    # GC and lineage rebuild exclude each other (GC reads the lineage to know what lives).
    _maintenance: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _maintenance_by: str = field(default="", init=False)
    _variants: Variants | None = field(default=None, init=False)

    @property
    def store(self) -> ObjectStore:
        store = self.runtime.store if self.runtime else None
        if store is None:
            raise RuntimeError("RegistryContext used before app.py wired its runtime")
        return store

    async def publisher(self) -> Publisher | None:
        """The publisher, once NATS is connected and the topology declared; else None."""
        if self._publisher is None:
            kv = await self.runtime.key_value(BUCKET) if self.runtime else None
            if kv is None or self.runtime is None or self.runtime.bus is None:
                return None
            bus = self.runtime.bus
            self._publisher = Publisher(
                store=self.store,
                catalog=VersionCatalog(kv),
                signer=self.signer,
                publish=bus.publish,
                spool_dir=self.settings.spool_dir,
                chunk_threshold_bytes=int(self.settings.chunk_min_mb * 1024 * 1024),
            )
        return self._publisher

    async def variants(self) -> Variants | None:
        """Variant and report registration, once connected; else None."""
        publisher = await self.publisher()
        kv = await self.runtime.key_value(VARIANTS_KV.bucket) if self.runtime else None
        if publisher is None or kv is None:
            return None
        if self._variants is None:
            self._variants = Variants(publisher, kv)
        return self._variants

    async def lineage(self) -> LineageStore | None:
        """The lineage index, once NATS is connected and its bucket declared; else None."""
        kv = await self.runtime.key_value(LINEAGE_KV.bucket) if self.runtime else None
        if kv is None:
            return None
        if self._lineage is None:
            self._lineage = LineageStore(kv)
        return self._lineage

    async def rebuild_lineage(self) -> dict[str, int]:
        bus = self.runtime.bus if self.runtime else None
        live = await self.lineage()
        if bus is None or live is None:
            raise RuntimeError("not connected")
        async with self._exclusive("a lineage rebuild"):
            return await rebuild(bus, live)

    async def collect_garbage(
        self, *, min_age_s: float, dry_run: bool, now: datetime | None = None
    ) -> GcReport:
        """Garbage collection, never while the lineage (what it keeps alive) is rebuilt."""
        publisher, variants = await self.publisher(), await self.variants()
        lineage = await self.lineage()
        if publisher is None or variants is None or lineage is None:
            raise RuntimeError("not connected")
        async with self._exclusive("garbage collection"):
            return await collect_garbage(
                publisher.store, publisher.catalog, lineage, min_age_s=min_age_s,
                dry_run=dry_run, indexed=await variants.indexed_manifests(), now=now,
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def _exclusive(self, what: str) -> AsyncIterator[None]:
        if self._maintenance.locked():
            raise MaintenanceBusy(f"{what} waits: {self._maintenance_by} is running")
        async with self._maintenance:
            self._maintenance_by = what
            yield
