"""Content-addressed object store client (S3 API: AWS, MinIO or the local server).

Every artifact (model weights, datasets, adapters) is stored once, under ``blobs/sha256/<hex>``,
and never changes: the key *is* the checksum, so readers can verify what they got and identical
uploads deduplicate for free. Digests are ``"sha256:<64 hex>"`` strings across the whole API.

The API is synchronous on purpose: boto3 is, and services call it through ``asyncio.to_thread``.
Nothing is ever held whole in memory: files are hashed and sent in chunks; one-shot streams (an
HTTP upload) longer than one part go through a multipart upload under ``staging/<uuid>`` and only
become a blob (server-side copy) after their digest and size were checked, while shorter ones are
checked in memory and written once; downloads are verified while they stream.

Writes of a blob key use ``If-None-Match: "*"`` where S3 allows it, so concurrent uploads of the
same content end as one object. Servers that ignore the header (the local one) still end with one
correct object, because every writer of a key writes the same bytes. A crash mid-upload can leave
an incomplete multipart upload or a ``staging/`` object: neither is a blob, and garbage collection
(or a bucket lifecycle rule) removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from slmops.objectstore.blobs import (
    _DIGEST_RE,
    BLOB_PREFIX,
    MAX_COPY_OBJECT,
    MAX_PARTS,
    MAX_PRESIGN_TTL_S,
    MIB,
    PART_SIZE,
    STAGING_PREFIX,
    BlobRef,
    Readable,
    StoredObject,
    blob_key,
    check_digest,
)
from slmops.objectstore.errors import (
    CorruptObjectError,
    DigestMismatchError,
    ObjectNotFoundError,
    ObjectStoreError,
    ObjectStoreUnavailable,
    SizeMismatchError,
)
from slmops.settings import PlatformSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(exc: ClientError) -> bool:
    return _code(exc) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _read_full(reader: Readable, n: int) -> bytes:
    """Read up to ``n`` bytes; sockets may return short reads before the end."""
    data = reader.read(n)
    chunks, got = [data], len(data)
    while 0 < got < n and (more := reader.read(n - got)):
        chunks.append(more)
        got += len(more)
    return data if len(chunks) == 1 else b"".join(chunks)


class ObjectStore:
    """A bucket of content-addressed blobs plus small documents (manifests). Thread-safe."""

    def __init__(
        self,
        endpoint_url: str | None,
        region: str,
        bucket: str,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        *,
        part_size: int = PART_SIZE,
        part_uploaders: int = 4,
    ) -> None:
        if part_size < 5 * MIB:
            raise ValueError(f"part_size must be >= 5 MiB (S3's minimum), got {part_size}")
        if part_uploaders < 1:
            raise ValueError(f"part_uploaders must be >= 1, got {part_uploaders}")
        self.bucket, self.region, self.part_size = bucket, region, part_size
        # Parts of a one-shot stream sent at once: throughput like boto3's own transfers, at a
        # memory cost of about twice this many parts (botocore keeps a copy while sending).
        self.part_uploaders = part_uploaders
        self.endpoint_url = endpoint_url or None
        self.endpoint = self.endpoint_url or f"AWS S3 ({region})"  # for messages: no secrets
        # One session per store: the default boto3 session isn't safe to share across threads.
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        # Path-style URLs: MinIO and local servers on an IP have no per-bucket host names.
        s3: Any = {"addressing_style": "path"} if self.endpoint_url else {}

        def client(connect_s: float, read_s: float, attempts: int) -> S3Client:
            retries: Any = {"mode": "standard", "total_max_attempts": attempts}
            cfg = Config(
                signature_version="s3v4",  # SigV4: presigned URLs of SigV2 are refused by many
                connect_timeout=connect_s,
                read_timeout=read_s,
                retries=retries,
                s3=s3,
            )
            return session.client("s3", endpoint_url=self.endpoint_url, config=cfg)

        self._client = client(5, 60, 5)
        self._ping_client = client(1, 2, 1)  # readiness probes must answer in seconds
        self._transfer = TransferConfig(
            multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=4
        )

    @classmethod
    def from_settings(cls, settings: PlatformSettings) -> ObjectStore:
        return cls(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
            access_key_id=settings.s3_access_key_id.get_secret_value(),
            secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        )

    def __repr__(self) -> str:  # never shows credentials
        return f"ObjectStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    def close(self) -> None:
        self._client.close()
        self._ping_client.close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn botocore's exceptions into ours, naming the endpoint but never the credentials."""
        try:
            yield
        except (HTTPClientError, BotoConnectionError) as exc:
            raise ObjectStoreUnavailable(f"{what}: {self.endpoint} unreachable: {exc}") from exc
        except ClientError as exc:
            if _code(exc) == "NoSuchBucket":
                raise ObjectStoreUnavailable(f"{what}: no bucket {self.bucket!r}") from exc
            if _is_missing(exc):
                raise ObjectNotFoundError(f"{what}: not found in {self.bucket!r}") from exc
            raise ObjectStoreError(f"{what} failed on {self.endpoint}: {exc}") from exc
        except BotoCoreError as exc:
            raise ObjectStoreError(f"{what} failed on {self.endpoint}: {exc}") from exc

    def _ref(self, digest: str, size: int) -> BlobRef:
        key = blob_key(digest)
        return BlobRef(digest=digest, size_bytes=size, key=key, uri=f"s3://{self.bucket}/{key}")

    def _head(self, key: str) -> int | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if _is_missing(exc) and _code(exc) != "NoSuchBucket":
                return None
            raise

    def _write_once(self, key: str, write: Callable[[], object]) -> None:
        """Create a blob key unless it exists; losing a race to another writer is success."""
        for attempt in range(3):
            if self._head(key) is not None:
                return
            try:
                write()
                return
            except ClientError as exc:
                if _code(exc) == "PreconditionFailed":  # If-None-Match: someone else wrote it
                    return
                # 409: a concurrent conditional write of the same key is in flight; re-check.
                if _code(exc) != "ConditionalRequestConflict" or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def ensure_bucket(self) -> None:
        """Create the bucket if it doesn't exist (idempotent, safe to race)."""
        with self._errors(f"ensure bucket {self.bucket!r}"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if not _is_missing(exc):
                    raise
            kwargs: Any = {"Bucket": self.bucket}
            if self.region != "us-east-1":  # us-east-1 rejects an explicit location
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self._client.create_bucket(**kwargs)
            except ClientError as exc:
                if _code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def ping(self) -> None:
        """Raise ObjectStoreUnavailable unless the bucket answers (one try, short timeouts)."""
        try:
            self._ping_client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            why = {"404": "does not exist", "403": "refuses our credentials"}
            msg = why.get(_code(exc), f"answers {exc}")
            raise ObjectStoreUnavailable(
                f"bucket {self.bucket!r} at {self.endpoint} {msg}"
            ) from exc
        except BotoCoreError as exc:  # unreachable, timed out, no credentials configured...
            raise ObjectStoreUnavailable(
                f"object store {self.endpoint} unavailable: {exc}"
            ) from exc

    def put_file(
        self,
        path: str | os.PathLike[str],
        *,
        expected_digest: str | None = None,
        hashed_digest: str | None = None,
    ) -> BlobRef:
        """Store a file as a blob: hash it (one streaming pass), then upload unless it exists.

        ``hashed_digest``: the caller has just hashed these very bytes itself (the registry
        hashes uploads while spooling them to its own temp file), so the pass is skipped.
        """
        path = Path(path)
        if expected_digest is not None:
            check_digest(expected_digest)
        before = path.stat()
        if hashed_digest is not None:
            ref = self._ref(check_digest(hashed_digest), before.st_size)
        else:
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(MIB):
                    h.update(chunk)
            ref = self._ref(f"sha256:{h.hexdigest()}", before.st_size)
        if expected_digest is not None and ref.digest != expected_digest:
            raise DigestMismatchError("digest mismatch", expected_digest, ref.digest)
        with self._errors(f"upload {path.name} as {ref.key}"):
            if self._head(ref.key) is not None:
                log.debug("blob %s already stored, upload skipped", ref.digest)
                return ref
            # s3transfer can't send If-None-Match; a racing writer writes the same bytes anyway.
            extra = {"ContentType": "application/octet-stream"}
            self._client.upload_file(
                str(path), self.bucket, ref.key, ExtraArgs=extra, Config=self._transfer
            )
            after = path.stat()
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                # What we sent may not hash to the key: don't leave a lying blob behind.
                self._client.delete_object(Bucket=self.bucket, Key=ref.key)
                raise ObjectStoreError(f"{path} changed while it was uploaded; nothing stored")
        return ref

    def put_stream(
        self,
        reader: Readable,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> BlobRef:
        """Store data readable only once; it becomes a blob only after digest and size check."""
        if expected_digest is not None:
            check_digest(expected_digest)
        c, bucket, part_size = self._client, self.bucket, self.part_size
        if expected_size:  # grow parts so huge uploads stay within S3's part count
            part_size = max(part_size, -(-expected_size // MAX_PARTS))
        h, size = hashlib.sha256(), 0

        def verified() -> BlobRef:
            ref = self._ref(f"sha256:{h.hexdigest()}", size)
            if expected_size is not None and size != expected_size:
                raise SizeMismatchError("size mismatch (bytes)", expected_size, size)
            if expected_digest is not None and ref.digest != expected_digest:
                raise DigestMismatchError("digest mismatch", expected_digest, ref.digest)
            return ref

        chunk = _read_full(reader, part_size)
        h.update(chunk)
        size += len(chunk)
        if len(chunk) < part_size:  # all of it is in memory and hashed: no staging needed
            ref = verified()
            with self._errors(f"upload {ref.key}"):
                self._write_once(
                    ref.key,
                    lambda: c.put_object(Bucket=bucket, Key=ref.key, Body=chunk, IfNoneMatch="*"),
                )
            return ref
        # With the digest announced, parts go straight to the blob's key: a multipart upload is
        # invisible until completed, and it is completed only after the bytes hashed right.
        # Without it, they go to a staging key and are copied once the digest is known.
        direct = expected_digest is not None
        if expected_digest is not None and self._head(blob_key(expected_digest)) is not None:
            while more := _read_full(reader, part_size):  # stored already: just check the bytes
                h.update(more)
                size += len(more)
            return verified()
        target = (
            blob_key(expected_digest) if expected_digest else f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        )
        with self._errors(f"upload via {target}"), ThreadPoolExecutor(self.part_uploaders) as pool:
            upload_id = c.create_multipart_upload(Bucket=bucket, Key=target)["UploadId"]
            completed = False
            try:
                sending: list[Future[Any]] = []
                while chunk:
                    while sum(not f.done() for f in sending) >= self.part_uploaders:
                        wait(sending, return_when=FIRST_COMPLETED)  # bounds parts in memory
                    n = len(sending) + 1
                    part: dict[str, Any] = {"Key": target, "UploadId": upload_id, "Body": chunk}
                    sending.append(pool.submit(c.upload_part, Bucket=bucket, PartNumber=n, **part))
                    del chunk, part  # the pool holds the part being sent; read the next one
                    chunk = _read_full(reader, part_size)
                    h.update(chunk)
                    size += len(chunk)
                parts = [
                    {"ETag": f.result()["ETag"], "PartNumber": i} for i, f in enumerate(sending, 1)
                ]
                ref = verified()
                self._complete(target, upload_id, parts, conditional=direct)
                completed = True
                if not direct:
                    self._write_once(ref.key, lambda: self._copy(target, ref.key, size))
            finally:  # best effort: a leftover is invisible to readers and GC removes it
                with contextlib.suppress(ClientError, BotoCoreError):
                    if not completed:
                        c.abort_multipart_upload(Bucket=bucket, Key=target, UploadId=upload_id)
                    elif not direct:
                        c.delete_object(Bucket=bucket, Key=target)
        return ref

    def _complete(self, key: str, upload_id: str, parts: list[Any], *, conditional: bool) -> None:
        """Complete a multipart upload; onto a blob key only if no one wrote it meanwhile."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket, "Key": key, "UploadId": upload_id,
            "MultipartUpload": {"Parts": parts},
        }  # fmt: skip
        if not conditional:
            self._client.complete_multipart_upload(**kwargs)
            return
        try:
            self._client.complete_multipart_upload(**kwargs, IfNoneMatch="*")
        except ClientError as exc:
            if _code(exc) != "PreconditionFailed":  # the same content got there first: fine
                raise
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def _copy(self, src: str, dest: str, size: int) -> None:
        source: Any = {"Bucket": self.bucket, "Key": src}
        if size <= MAX_COPY_OBJECT:
            self._client.copy_object(
                Bucket=self.bucket, Key=dest, CopySource=source, IfNoneMatch="*"
            )
        else:  # multipart server-side copy: no If-None-Match, but racers copy the same bytes
            self._client.copy(source, self.bucket, dest, Config=self._transfer)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        """Store a small mutable document (a manifest) under ``key``, outside the blob space."""
        if not key or key.startswith(("/", "blobs/", STAGING_PREFIX)):
            raise ValueError(f"invalid document key {key!r}: blobs/ and staging/ are reserved")
        with self._errors(f"put {key}"):
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
            )

    def get_bytes(self, key: str) -> bytes:
        with self._errors(f"get {key}"):
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def exists(self, digest: str) -> bool:
        return self.stat(digest) is not None

    def stat(self, digest: str) -> BlobRef | None:
        key = blob_key(digest)
        with self._errors(f"stat {key}"):
            size = self._head(key)
        return None if size is None else self._ref(digest, size)

    def iter_verified(self, digest: str, chunk_size: int = MIB) -> Iterator[bytes]:
        """Yield the blob's bytes; raise CorruptObjectError at the end if they don't match."""
        key, h = blob_key(digest), hashlib.sha256()
        with self._errors(f"get {key}"):
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                for chunk in body.iter_chunks(chunk_size):
                    h.update(chunk)
                    yield chunk
        if (actual := f"sha256:{h.hexdigest()}") != digest:
            raise CorruptObjectError(f"corrupt object {key}", digest, actual)

    def get_to_file(self, digest: str, dest_path: str | os.PathLike[str]) -> BlobRef:
        """Download a blob to ``dest_path``, which appears only once its content is verified."""
        dest, size = Path(dest_path), 0
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
        try:
            with partial.open("wb") as f:
                for chunk in self.iter_verified(digest):
                    f.write(chunk)
                    size += len(chunk)
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)
        return self._ref(digest, size)

    def presign_get(self, digest: str, ttl_s: int) -> str:
        """A URL anyone can GET the blob from for ``ttl_s`` seconds (existence isn't checked)."""
        if not 1 <= ttl_s <= MAX_PRESIGN_TTL_S:
            raise ValueError(f"ttl_s must be within 1..{MAX_PRESIGN_TTL_S} (7 days), got {ttl_s}")
        params = {"Bucket": self.bucket, "Key": blob_key(digest)}
        with self._errors(f"presign {params['Key']}"):
            return self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)

    def presign_staging_put(self, ttl_s: int) -> tuple[str, str]:
        """A fresh ``staging/<uuid>`` key and a URL to PUT a large upload straight into the
        store; :meth:`promote_staging` turns it into a blob once its digest is checked. The
        client must send ``Content-Type: application/octet-stream`` (it is signed)."""
        if not 1 <= ttl_s <= MAX_PRESIGN_TTL_S:
            raise ValueError(f"ttl_s must be within 1..{MAX_PRESIGN_TTL_S} (7 days), got {ttl_s}")
        key = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        params = {"Bucket": self.bucket, "Key": key, "ContentType": "application/octet-stream"}
        with self._errors(f"presign {key}"):
            url = self._client.generate_presigned_url("put_object", Params=params, ExpiresIn=ttl_s)
        return key, url

    def promote_staging(
        self, staging_key: str, *, expected_digest: str, expected_size: int | None = None
    ) -> BlobRef:
        """Hash a staged upload as it streams; if it matches, it becomes the blob (server-side
        copy) and the staged object goes; if not, the staged object goes and nothing else."""
        check_digest(expected_digest)
        if not staging_key.startswith(STAGING_PREFIX) or "/" in staging_key[len(STAGING_PREFIX) :]:
            raise ValueError(f"not a staging key: {staging_key!r}")
        h, size = hashlib.sha256(), 0
        try:
            with self._errors(f"get {staging_key}"):
                body = self._client.get_object(Bucket=self.bucket, Key=staging_key)["Body"]
                for chunk in body.iter_chunks(MIB):
                    h.update(chunk)
                    size += len(chunk)
            actual = f"sha256:{h.hexdigest()}"
            if expected_size is not None and size != expected_size:
                raise SizeMismatchError("size mismatch (bytes)", expected_size, size)
            if actual != expected_digest:
                raise DigestMismatchError("digest mismatch", expected_digest, actual)
            key = blob_key(actual)
            self._write_once(key, lambda: self._copy(staging_key, key, size))
            return self._ref(actual, size)
        finally:
            with contextlib.suppress(ObjectStoreError):
                self.delete_key(staging_key)

    def delete(self, digest: str) -> None:
        """Remove a blob (idempotent). Blobs are immutable: only garbage collection deletes."""
        key = blob_key(digest)
        with self._errors(f"delete {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under ``prefix`` with its size and age, page by page."""
        pages = self._client.get_paginator("list_objects_v2")
        with self._errors(f"list {prefix}"):
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield StoredObject(
                        key=obj["Key"], size_bytes=obj["Size"], last_modified=obj["LastModified"]
                    )

    def list_blobs(self) -> Iterator[BlobRef]:
        """Every blob, page by page (for garbage collection)."""
        for obj in self.list_objects(BLOB_PREFIX):
            digest = "sha256:" + obj.key.removeprefix(BLOB_PREFIX)
            if _DIGEST_RE.fullmatch(digest):
                yield self._ref(digest, obj.size_bytes)
            else:
                log.warning("ignoring foreign object %s under %s", obj.key, BLOB_PREFIX)

    def delete_key(self, key: str) -> None:
        """Remove a non-blob object (a staging leftover, an unreferenced manifest)."""
        with self._errors(f"delete {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)
