"""Split a file into content-defined chunks (streaming; memory stays around ``max_size``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from io import BufferedReader
from pathlib import Path

from pydantic import ValidationError

from slmops.chunking.gear import find_cut, masks
from slmops.chunking.manifest import (
    DEFAULT_AVG_SIZE_BYTES,
    DEFAULT_MAX_SIZE_BYTES,
    DEFAULT_MIN_SIZE_BYTES,
    MIB,
    Chunk,
    ChunkerParams,
    ChunkManifest,
)

_BLOCK = 1 * MIB  # read size


class _Window:
    """The bytes of ``f`` from a moving start on, in one fixed buffer; hashes all it reads."""

    def __init__(self, f: BufferedReader, path: Path, size: int, span: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.buf, self.base, self.filled = bytearray(span + _BLOCK), 0, 0
        self.sha = hashlib.sha256()

    def cover(self, start: int, end: int) -> tuple[bytearray, int]:
        """Hold file bytes [start, end), at most ``span`` of them; return (buffer, file offset
        of buffer[0]); only buffer[:end - offset] is meaningful."""
        with memoryview(self.buf) as mv:
            if skip := start - self.base:  # move the unused tail to the front
                mv[: self.filled - skip] = mv[skip : self.filled]
                self.base, self.filled = start, self.filled - skip
            while self.base + self.filled < end:
                want = min(_BLOCK, self.size - self.base - self.filled)
                got = self.f.readinto(mv[self.filled : self.filled + want])
                if not got:
                    raise OSError(f"{self.path} shrank while it was chunked")
                self.sha.update(mv[self.filled : self.filled + got])
                self.filled += got
        return self.buf, self.base


def _forced_cuts(boundaries: Sequence[int], size: int) -> list[int]:
    cuts = set()
    for b in boundaries:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= size:
            raise ValueError(f"boundary {b!r} is not a byte offset within the file (0..{size})")
        if 0 < b < size:
            cuts.add(b)
    return sorted(cuts)


def chunk_file(
    path: str | os.PathLike[str],
    *,
    boundaries: Sequence[int] = (),
    min_size_bytes: int = DEFAULT_MIN_SIZE_BYTES,
    avg_size_bytes: int = DEFAULT_AVG_SIZE_BYTES,
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
) -> ChunkManifest:
    """Cut the file at ``path`` into content-defined chunks (``fastcdc-gear-v1``).

    ``boundaries`` are byte offsets that always start a chunk (e.g. where each tensor or tar
    member begins), so an edit inside one region can't move the chunks of the next: the chunker
    restarts there as at the start of a file. Chunks are ``min..max`` bytes, except those that
    end at a forced boundary or at the end of the file, which may be shorter.
    """
    try:
        params = ChunkerParams(
            min_size_bytes=min_size_bytes,
            avg_size_bytes=avg_size_bytes,
            max_size_bytes=max_size_bytes,
        )
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValueError(f"invalid chunk sizes: {msgs}") from None
    mask_s, mask_l = masks(avg_size_bytes)
    path = Path(path)
    chunks: list[Chunk] = []
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        cuts, next_cut = _forced_cuts(boundaries, size), 0
        window, start = _Window(f, path, size, max_size_bytes), 0
        while start < size:
            while next_cut < len(cuts) and cuts[next_cut] <= start:
                next_cut += 1
            limit = min(start + max_size_bytes, cuts[next_cut] if next_cut < len(cuts) else size)
            buf, base = window.cover(start, limit)
            s, e = start - base, limit - base
            if e - s > min_size_bytes:
                h0, normal = s + min_size_bytes, min(s + avg_size_bytes, e)
                i = find_cut(buf, h0, h0, normal, mask_s)
                if i < 0:
                    i = find_cut(buf, h0, normal, e, mask_l)
                e = e if i < 0 else i + 1
            digest = "sha256:" + hashlib.sha256(memoryview(buf)[s:e]).hexdigest()
            chunks.append(Chunk(offset_bytes=start, size_bytes=e - s, digest=digest))
            start += e - s
        if f.read(1):
            raise OSError(f"{path} grew while it was chunked")
    return ChunkManifest(
        blob_digest="sha256:" + window.sha.hexdigest(),
        size_bytes=size,
        chunks=chunks,
        chunker=params,
    )
