"""The validator's disk: variants and references downloaded once per digest, verified.

A reference (the fp32 conversion) is shared by every variant of a model version, so it is
fetched once and kept; the oldest files go when the cache passes ``cache_max_mb``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from slmops.events.payloads import ArtifactRef
from slmops.objectstore import ObjectStore


class ModelCache:
    def __init__(self, root: Path, store: ObjectStore, max_mb: float) -> None:
        self.root = root
        self.store = store
        self.max_mb = max_mb
        self._locks: dict[str, asyncio.Lock] = {}
        root.mkdir(parents=True, exist_ok=True)

    async def fetch(self, artifact: ArtifactRef) -> Path:
        """The artifact's bytes on disk (downloaded and verified on first use)."""
        hex_digest = artifact.digest.removeprefix("sha256:")
        path = self.root / f"{hex_digest}.onnx"
        async with self._locks.setdefault(hex_digest, asyncio.Lock()):
            if not path.exists():
                await asyncio.to_thread(self.store.get_to_file, artifact.digest, path)
                await asyncio.to_thread(self._prune, keep=path)
        path.touch()  # recently used
        return path

    def _prune(self, keep: Path) -> None:
        files = sorted(self.root.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.max_mb * 1e6:
                break
            if old != keep:
                total -= old.stat().st_size
                old.unlink(missing_ok=True)
