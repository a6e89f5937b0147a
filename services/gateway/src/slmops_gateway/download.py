"""Downloads through presigned URLs: resumed where a broken one stopped, verified as written.

The bytes land in ``<digest>.partial`` and are hashed as they arrive; a retry asks only for the
missing range (``Range: bytes=N-``) after re-hashing what is on disk. The file becomes
``<digest>.onnx`` only when its sha256 is the manifest's digest: a tampered or truncated
artifact never reaches a model slot.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from slmops_gateway.verify import Refused

_CHUNK = 1 << 20


async def download(
    url: str, digest: str, size_bytes: int, folder: Path, client: httpx.AsyncClient
) -> Path:
    """The verified file for ``digest``, fetched (or resumed) from ``url``."""
    folder.mkdir(parents=True, exist_ok=True)
    hex_digest = digest.removeprefix("sha256:")
    final = folder / f"{hex_digest}.onnx"
    if final.exists():
        return final
    partial = folder / f"{hex_digest}.partial"
    sha = hashlib.sha256()
    have = 0
    if partial.exists():  # resume: what is on disk counts once re-hashed
        with partial.open("rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
                have += len(chunk)
    if have > size_bytes:
        partial.unlink()
        sha, have = hashlib.sha256(), 0
    if have < size_bytes:
        headers = {"Range": f"bytes={have}-"} if have else {}
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code not in (200, 206):
                raise ConnectionError(f"download of {digest} answered {response.status_code}")
            if have and response.status_code == 200:  # the server ignored the range: restart
                sha, have = hashlib.sha256(), 0
                partial.unlink(missing_ok=True)
            with partial.open("ab") as out:
                async for chunk in response.aiter_bytes(_CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
                    have += len(chunk)
    actual = f"sha256:{sha.hexdigest()}"
    if actual != digest:
        partial.unlink(missing_ok=True)
        raise Refused(
            f"tampered or corrupt artifact: its {have} bytes hash to {actual}, the signed "
            f"manifest says {digest}"
        )
    partial.replace(final)
    return final
