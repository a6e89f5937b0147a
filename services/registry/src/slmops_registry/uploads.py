"""Receiving an upload: spool the request body to a temp file, hashing and counting as it comes.

Spooled rather than piped straight to S3: the body is read once at network speed while the
digest and size are checked, nothing is visible in the store until the whole body arrived and
matched what the client announced, and a client that disconnects halfway leaves only a temp
file, deleted on the spot. Memory stays at one chunk whatever the size.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from slmops.objectstore import check_digest
from slmops.objectstore.blobs import Readable
from slmops_registry.errors import RegistryError

T = TypeVar("T")
_HAND_OVER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SpooledUpload:
    path: Path
    digest: str
    size_bytes: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


async def spool_upload(
    chunks: AsyncIterator[bytes],
    *,
    spool_dir: Path,
    max_size_bytes: int,
    declared_size_bytes: int | None,
    expected_digest: str | None,
) -> SpooledUpload:
    """Write ``chunks`` to a temp file under ``spool_dir``; check size and digest at the end.

    Raises :class:`RegistryError` (413 too large, 400 truncated or mismatched, 422 bad digest
    syntax) and removes the temp file on every failure, including a disconnected client.
    """
    if expected_digest is not None:
        try:
            check_digest(expected_digest)
        except ValueError as exc:
            raise RegistryError(422, str(exc)) from exc
    if declared_size_bytes is not None and declared_size_bytes > max_size_bytes:
        raise RegistryError(
            413, f"upload of {declared_size_bytes} bytes exceeds the limit of {max_size_bytes}"
        )
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=spool_dir)
    path = Path(name)
    sha, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_size_bytes:
                    raise RegistryError(413, f"upload exceeds the limit of {max_size_bytes} bytes")
                sha.update(chunk)
                out.write(chunk)
        digest = "sha256:" + sha.hexdigest()
        if declared_size_bytes is not None and size != declared_size_bytes:
            raise RegistryError(
                400, f"truncated upload: received {size} of {declared_size_bytes} bytes"
            )
        if expected_digest is not None and digest != expected_digest:
            raise RegistryError(
                400, f"digest mismatch: the body hashes to {digest}, not {expected_digest}"
            )
    except BaseException:  # includes a client disconnect and cancellation
        path.unlink(missing_ok=True)
        raise
    return SpooledUpload(path, digest, size)


class _ThreadReader:
    """The blocking ``read(n)`` side of an async byte stream, for a worker thread."""

    def __init__(self, maxsize: int) -> None:
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize)
        self._buffer = bytearray()
        self._eof = False

    def read(self, n: int = -1, /) -> bytes:
        while (n < 0 or len(self._buffer) < n) and not self._eof:
            item = self.queue.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self._buffer += item
        size = len(self._buffer) if n < 0 else n
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


async def pipe_upload(
    chunks: AsyncIterator[bytes],
    store_stream: Callable[[Readable], T],
    *,
    max_size_bytes: int,
    declared_size_bytes: int | None,
) -> T:
    """Hand ``chunks`` to ``store_stream`` running in a thread while they still arrive.

    Used when the client announced the digest: the object store can then write straight to
    the blob's key (invisible until it checked the digest), so receiving and storing overlap
    and nothing is spooled. Hands over ~1 MiB at a time; a bounded queue applies backpressure.
    """
    if declared_size_bytes is not None and declared_size_bytes > max_size_bytes:
        raise RegistryError(
            413, f"upload of {declared_size_bytes} bytes exceeds the limit of {max_size_bytes}"
        )
    reader = _ThreadReader(maxsize=8)
    worker = asyncio.get_running_loop().run_in_executor(None, store_stream, reader)

    async def hand_over(item: bytes | BaseException | None) -> None:
        while not worker.done():  # a worker that failed stops reading: don't wait for it
            try:
                await asyncio.to_thread(reader.queue.put, item, True, 0.5)
                return
            except queue.Full:
                continue

    size, batch = 0, bytearray()
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_size_bytes:
                raise RegistryError(413, f"upload exceeds the limit of {max_size_bytes} bytes")
            batch += chunk
            if len(batch) >= _HAND_OVER_BYTES:
                await hand_over(bytes(batch))
                batch.clear()
        await hand_over(bytes(batch))
        await hand_over(None)
    except BaseException as exc:  # a disconnect or refusal: the worker aborts its upload
        await hand_over(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
        await asyncio.gather(worker, return_exceptions=True)
        raise
    return await worker
