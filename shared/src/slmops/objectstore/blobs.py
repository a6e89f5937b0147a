"""Content addressing: digests, blob keys, and the reference to a stored blob."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from slmops.objectstore.errors import InvalidDigestError

BLOB_PREFIX = "blobs/sha256/"
STAGING_PREFIX = "staging/"
MIB = 1024 * 1024
PART_SIZE = 8 * MIB  # S3 needs >= 5 MiB per part; 8 MiB bounds memory of one-shot streams
MAX_PARTS = 10_000  # S3's limit per multipart upload
MAX_COPY_OBJECT = 5 * 1024 * MIB  # CopyObject's limit; larger blobs need a multipart copy
MAX_PRESIGN_TTL_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class BlobRef(BaseModel):
    """Where one immutable blob lives."""

    model_config = ConfigDict(frozen=True)
    digest: str
    size_bytes: int
    key: str
    uri: str


class StoredObject(BaseModel):
    """Any object in the bucket, as a listing shows it."""

    model_config = ConfigDict(frozen=True)
    key: str
    size_bytes: int
    last_modified: datetime


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>``, else raise InvalidDigestError."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise InvalidDigestError(
            f"invalid digest {digest!r}: expected 'sha256:' + 64 lowercase hex"
        )
    return digest


def blob_key(digest: str) -> str:
    return BLOB_PREFIX + check_digest(digest).removeprefix("sha256:")
