"""Content-addressed object store on the S3 API (AWS, MinIO, the local server)."""

from slmops.objectstore.blobs import (
    BLOB_PREFIX,
    STAGING_PREFIX,
    BlobRef,
    StoredObject,
    blob_key,
    check_digest,
)
from slmops.objectstore.client import ObjectStore
from slmops.objectstore.errors import (
    CorruptObjectError,
    DigestMismatchError,
    InvalidDigestError,
    ObjectNotFoundError,
    ObjectStoreError,
    ObjectStoreUnavailable,
    SizeMismatchError,
)

__all__ = [
    "BLOB_PREFIX",
    "STAGING_PREFIX",
    "BlobRef",
    "CorruptObjectError",
    "DigestMismatchError",
    "InvalidDigestError",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "SizeMismatchError",
    "StoredObject",
    "blob_key",
    "check_digest",
]
