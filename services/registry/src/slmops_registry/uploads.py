"""Receiving an upload: spool the request body to a temp file, hashing and counting as it comes.

Spooled rather than piped straight to S3: the body is read once at network speed while the
digest and size are checked, nothing is visible in the store until the whole body arrived and
matched what the client announced, and a client that disconnects halfway leaves only a temp
file, deleted on the spot. Memory stays at one chunk whatever the size.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from slmops.objectstore import check_digest
from slmops_registry.errors import RegistryError


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
