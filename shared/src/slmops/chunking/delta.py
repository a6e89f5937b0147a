"""Delta downloads: what to fetch, which local chunks to reuse, and verified reassembly."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from slmops.chunking.manifest import ChunkIntegrityError, ChunkManifest

log = logging.getLogger(__name__)


class FetchPlan(BaseModel):
    """The chunks a consumer lacks: each distinct digest once, in file order."""

    model_config = ConfigDict(frozen=True)
    missing: list[str]
    fetch_bytes: int  # what ``missing`` weighs (each digest counted once)
    total_bytes: int  # the whole blob

    @property
    def fetch_fraction(self) -> float:
        return self.fetch_bytes / self.total_bytes if self.total_bytes else 0.0


def plan_fetch(manifest: ChunkManifest, have: Iterable[str]) -> FetchPlan:
    """Which chunks of ``manifest`` to download, given the chunk digests already at hand."""
    known, missing, fetch = set(have), [], 0
    for c in manifest.chunks:
        if c.digest not in known:
            known.add(c.digest)
            missing.append(c.digest)
            fetch += c.size_bytes
    return FetchPlan(missing=missing, fetch_bytes=fetch, total_bytes=manifest.size_bytes)


def index_local_chunks(
    path: str | os.PathLike[str], manifest_of_local_file: ChunkManifest
) -> dict[str, tuple[int, int]]:
    """``{digest: (offset, size)}`` of the chunks of a local file that still hash right.

    Chunks that no longer match (the file was changed or damaged) are left out, so they get
    fetched instead.
    """
    index: dict[str, tuple[int, int]] = {}
    with Path(path).open("rb") as f:
        for c in manifest_of_local_file.chunks:
            data = f.read(c.size_bytes)
            if c.digest in index:
                continue
            if len(data) == c.size_bytes and _digest(data) == c.digest:
                index[c.digest] = (c.offset_bytes, c.size_bytes)
            else:
                log.debug("local chunk at %d of %s doesn't match; not reused", c.offset_bytes, path)
    return index


def assemble(
    manifest: ChunkManifest, read_chunk: Callable[[str], bytes], dest_path: str | os.PathLike[str]
) -> None:
    """Write the blob of ``manifest`` to ``dest_path`` from ``read_chunk(digest)``.

    Every chunk and then the whole blob are verified; ``dest_path`` appears (atomic rename of a
    temp file beside it) only if all match. On a mismatch nothing is left behind and
    :class:`ChunkIntegrityError` names the chunk.
    """
    dest = Path(dest_path)
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
    sha = hashlib.sha256()
    try:
        with partial.open("wb") as f:
            for i, c in enumerate(manifest.chunks):
                data = read_chunk(c.digest)
                what = f"chunk {i} (offset {c.offset_bytes}, {c.digest})"
                if len(data) != c.size_bytes:
                    raise ChunkIntegrityError(f"{what} size", c.size_bytes, len(data))
                if (actual := _digest(data)) != c.digest:
                    raise ChunkIntegrityError(f"{what} digest", c.digest, actual)
                sha.update(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if (blob := "sha256:" + sha.hexdigest()) != manifest.blob_digest:
            raise ChunkIntegrityError(f"blob {dest.name}", manifest.blob_digest, blob)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
