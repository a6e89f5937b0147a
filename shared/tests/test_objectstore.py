"""ObjectStore against a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from slmops.objectstore import (
    BlobRef,
    CorruptObjectError,
    DigestMismatchError,
    InvalidDigestError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreUnavailable,
    SizeMismatchError,
    check_digest,
)
from slmops.testing.s3 import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes in 1 MiB chunks; return their digest."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        for offset in range(0, size, MIB):
            chunk = os.urandom(min(MIB, size - offset))
            h.update(chunk)
            f.write(chunk)
    return "sha256:" + h.hexdigest()


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def make_store(endpoint: str, bucket: str) -> ObjectStore:
    return ObjectStore(endpoint, TEST_REGION, bucket, TEST_ACCESS_KEY, TEST_SECRET_KEY)


@pytest.fixture
def raw(s3_server: str) -> Any:
    """A plain boto3 client, to look at or damage the bucket behind the store's back."""
    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name=TEST_REGION,
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
    )


@pytest.fixture
def bucket_state(raw: Any, object_store: ObjectStore) -> Callable[[], tuple[list[str], int]]:
    """Every key in the test bucket, and how many multipart uploads are still open."""

    def state() -> tuple[list[str], int]:
        listing = raw.list_objects_v2(Bucket=object_store.bucket)
        uploads = raw.list_multipart_uploads(Bucket=object_store.bucket)
        keys = sorted(o["Key"] for o in listing.get("Contents", []))
        return keys, len(uploads.get("Uploads", []))

    return state


@pytest.fixture(scope="module")
def isolated_s3() -> Iterator[str]:
    """A moto server in another process, so tracemalloc sees only the client's memory."""
    script = (
        "import sys\n"
        "from moto.server import ThreadedMotoServer\n"
        "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
        "s.start()\n"
        "print(s.get_host_and_port()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the server exits at EOF on stdin
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_large_file_round_trip_streams_with_bounded_memory(
    isolated_s3: str, tmp_path: Path
) -> None:
    size = 50 * MIB
    src, dest = tmp_path / "weights.bin", tmp_path / "out" / "weights.bin"
    dest.parent.mkdir()
    digest = write_random(src, size)
    store = ObjectStore(  # 2 x 5 MiB parts in flight: the bound below, whatever the file size
        isolated_s3, TEST_REGION, "memory-bound", TEST_ACCESS_KEY, TEST_SECRET_KEY,
        part_size=5 * MIB, part_uploaders=2,
    )  # fmt: skip
    store.ensure_bucket()

    tracemalloc.start()
    try:
        ref = store.put_file(src, expected_digest=digest)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        got = store.get_to_file(digest, dest)
        _, get_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with src.open("rb") as f:
            streamed = store.put_stream(f, expected_size=size)
        _, stream_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        store.close()

    assert ref == got == streamed
    assert ref.digest == digest
    assert ref.size_bytes == size
    assert ref.key == f"blobs/sha256/{digest.removeprefix('sha256:')}"
    assert ref.uri == f"s3://memory-bound/{ref.key}"
    assert file_digest(dest) == digest
    # Nothing holds the 50 MiB file: only parts in flight (botocore keeps a copy of each while
    # sending), the one being read and the next: (2 x 2 + 2) x 5 MiB = 30 MiB at most.
    assert put_peak < 30 * MIB, f"put_file peaked at {put_peak / MIB:.1f} MiB"
    assert get_peak < 30 * MIB, f"get_to_file peaked at {get_peak / MIB:.1f} MiB"
    assert stream_peak < 30 * MIB, f"put_stream peaked at {stream_peak / MIB:.1f} MiB"


def test_put_file_skips_upload_of_existing_blob(
    object_store: ObjectStore, raw: Any, tmp_path: Path
) -> None:
    src = tmp_path / "a.bin"
    digest = write_random(src, 1000)
    first = object_store.put_file(src)
    # Replace the stored bytes with a marker: a second upload would overwrite it.
    raw.put_object(Bucket=object_store.bucket, Key=first.key, Body=b"marker")

    second = object_store.put_file(src)

    assert first == second
    assert first.digest == digest
    assert raw.get_object(Bucket=object_store.bucket, Key=first.key)["Body"].read() == b"marker"


def test_put_stream_multipart_from_file(
    object_store: ObjectStore, tmp_path: Path, bucket_state: Callable[[], tuple[list[str], int]]
) -> None:
    src = tmp_path / "data.bin"
    size = 2 * object_store.part_size + 12345  # three parts, the last one short
    digest = write_random(src, size)

    with src.open("rb") as f:
        ref = object_store.put_stream(f, expected_digest=digest, expected_size=size)

    assert (ref.digest, ref.size_bytes) == (digest, size)
    assert bucket_state() == ([ref.key], 0)  # no staging object, no open upload
    dest = tmp_path / "back.bin"
    object_store.get_to_file(digest, dest)
    assert dest.read_bytes() == src.read_bytes()


def test_put_stream_small_single_put(
    object_store: ObjectStore, bucket_state: Callable[[], tuple[list[str], int]]
) -> None:
    data = b'{"hello": "world"}'

    ref = object_store.put_stream(io.BytesIO(data), expected_size=len(data))

    assert (ref.digest, ref.size_bytes) == (sha256_of(data), len(data))
    assert bucket_state() == ([ref.key], 0)
    assert b"".join(object_store.iter_verified(ref.digest, chunk_size=4)) == data


def test_put_stream_empty_data(object_store: ObjectStore) -> None:
    ref = object_store.put_stream(io.BytesIO(b""))

    assert (ref.digest, ref.size_bytes) == (sha256_of(b""), 0)
    assert object_store.stat(ref.digest) == ref


def test_corrupted_object_detected_on_get(
    object_store: ObjectStore, raw: Any, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB)
    ref = object_store.put_stream(io.BytesIO(data))
    damaged = bytearray(data)
    damaged[MIB] ^= 0xFF  # one flipped byte, same size
    raw.put_object(Bucket=object_store.bucket, Key=ref.key, Body=bytes(damaged))
    dest = tmp_path / "model.bin"

    with pytest.raises(CorruptObjectError) as caught:
        object_store.get_to_file(ref.digest, dest)

    assert caught.value.expected == ref.digest
    assert caught.value.actual == sha256_of(bytes(damaged))
    assert ref.digest in str(caught.value)
    assert sha256_of(bytes(damaged)) in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # neither dest nor a partial file
    with pytest.raises(CorruptObjectError):
        for _ in object_store.iter_verified(ref.digest):
            pass


def test_corrupted_get_keeps_existing_dest_file(
    object_store: ObjectStore, raw: Any, tmp_path: Path
) -> None:
    ref = object_store.put_stream(io.BytesIO(b"good bytes"))
    raw.put_object(Bucket=object_store.bucket, Key=ref.key, Body=b"evil bytes")
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"previous version")

    with pytest.raises(CorruptObjectError):
        object_store.get_to_file(ref.digest, dest)

    assert dest.read_bytes() == b"previous version"
    assert list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("size", [1000, 2 * 8 * MIB + 1], ids=["single-put", "multipart"])
def test_expected_digest_mismatch_leaves_nothing(
    object_store: ObjectStore, bucket_state: Callable[[], tuple[list[str], int]], size: int
) -> None:
    data = os.urandom(size)
    wrong = sha256_of(b"something else")

    with pytest.raises(DigestMismatchError) as caught:
        object_store.put_stream(io.BytesIO(data), expected_digest=wrong)

    assert (caught.value.expected, caught.value.actual) == (wrong, sha256_of(data))
    assert bucket_state() == ([], 0)
    assert not object_store.exists(sha256_of(data))


@pytest.mark.parametrize("size", [1000, 2 * 8 * MIB + 1], ids=["single-put", "multipart"])
def test_truncated_stream_is_size_mismatch_and_leaves_nothing(
    object_store: ObjectStore, bucket_state: Callable[[], tuple[list[str], int]], size: int
) -> None:
    data = os.urandom(size)

    with pytest.raises(SizeMismatchError) as caught:
        object_store.put_stream(io.BytesIO(data[:-100]), expected_size=size)

    assert (caught.value.expected, caught.value.actual) == (size, size - 100)
    assert bucket_state() == ([], 0)


def test_reader_failing_midway_aborts_upload(
    object_store: ObjectStore, bucket_state: Callable[[], tuple[list[str], int]]
) -> None:
    class Disconnecting(io.RawIOBase):
        """A client that sends 20 MiB, then drops the connection."""

        sent = 0

        def read(self, n: int = -1) -> bytes:
            if self.sent >= 20 * MIB:
                raise ConnectionResetError("client went away")
            self.sent += n
            return b"x" * n

    with pytest.raises(ConnectionResetError):
        object_store.put_stream(Disconnecting())

    assert bucket_state() == ([], 0)


def test_put_file_expected_digest_mismatch_uploads_nothing(
    object_store: ObjectStore, tmp_path: Path, bucket_state: Callable[[], tuple[list[str], int]]
) -> None:
    src = tmp_path / "a.bin"
    write_random(src, 1000)

    with pytest.raises(DigestMismatchError):
        object_store.put_file(src, expected_digest=sha256_of(b"other"))

    assert bucket_state() == ([], 0)


def test_concurrent_uploads_of_same_content_end_as_one_blob(
    object_store: ObjectStore, bucket_state: Callable[[], tuple[list[str], int]]
) -> None:
    data = os.urandom(object_store.part_size + 4096)  # multipart: staging, then copy
    start = threading.Barrier(4)
    results: list[BlobRef] = []
    errors: list[BaseException] = []

    def upload() -> None:
        start.wait()
        try:
            results.append(object_store.put_stream(io.BytesIO(data)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(results) == 4
    assert {r.digest for r in results} == {sha256_of(data)}
    assert bucket_state() == ([results[0].key], 0)
    assert b"".join(object_store.iter_verified(sha256_of(data))) == data


def test_presigned_get_downloads_blob(object_store: ObjectStore, s3_server: str) -> None:
    data = os.urandom(100_000)
    ref = object_store.put_stream(io.BytesIO(data))

    url = object_store.presign_get(ref.digest, ttl_s=60)

    assert url.startswith(s3_server + "/")  # 127.0.0.1 only
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]  # SigV4, not the legacy SigV2
    assert query["X-Amz-Expires"] == ["60"]
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data


@pytest.mark.parametrize("ttl_s", [0, -5, 7 * 24 * 3600 + 1])
def test_presign_rejects_invalid_ttl(object_store: ObjectStore, ttl_s: int) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        object_store.presign_get(sha256_of(b"x"), ttl_s=ttl_s)


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "a" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        " sha256:" + "a" * 64,
        "sha256:" + "a" * 64 + "\n",
    ],
)
def test_check_digest_rejects_malformed(digest: str) -> None:
    with pytest.raises(InvalidDigestError, match="invalid digest"):
        check_digest(digest)


def test_every_call_rejects_invalid_digest(object_store: ObjectStore, tmp_path: Path) -> None:
    digest = "sha256:../../" + "a" * 58  # would escape blobs/ if it reached a key
    calls: list[Callable[[], object]] = [
        lambda: object_store.exists(digest),
        lambda: object_store.stat(digest),
        lambda: object_store.get_to_file(digest, tmp_path / "x"),
        lambda: list(object_store.iter_verified(digest)),
        lambda: object_store.presign_get(digest, 60),
        lambda: object_store.delete(digest),
        lambda: object_store.put_stream(io.BytesIO(b"x"), expected_digest=digest),
        lambda: object_store.put_file(tmp_path / "x", expected_digest=digest),
    ]
    for call in calls:
        with pytest.raises(InvalidDigestError):
            call()
    assert list(tmp_path.iterdir()) == []
    assert check_digest(sha256_of(b"ok")) == sha256_of(b"ok")


def test_ping_ok_and_missing_bucket(object_store: ObjectStore, s3_server: str) -> None:
    object_store.ping()
    missing = make_store(s3_server, "no-such-bucket-here")

    with pytest.raises(ObjectStoreUnavailable, match="no-such-bucket-here"):
        missing.ping()

    missing.ensure_bucket()
    missing.ensure_bucket()  # idempotent
    missing.ping()


def test_ping_unreachable_endpoint_fails_fast() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    store = make_store(endpoint, "anything")

    with pytest.raises(ObjectStoreUnavailable, match=endpoint):
        store.ping()

    assert TEST_SECRET_KEY not in repr(store)


def test_ping_hung_endpoint_fails_within_seconds() -> None:
    # The kernel completes the TCP handshake on a listening socket nobody accept()s, so the
    # request is sent and never answered: only ping's short read timeout can end it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        store = make_store(endpoint, "anything")

        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable, match=endpoint):
            store.ping()
        elapsed = time.monotonic() - started

        sock.setblocking(False)
        attempts = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.accept()[0].close()
                attempts += 1

    assert attempts == 1  # a readiness probe doesn't retry
    # Loose on purpose: the regular client would wait 60 s per attempt, ping waits 2 s.
    assert elapsed < 10, f"ping took {elapsed:.1f}s"


def test_exists_stat_delete_list(object_store: ObjectStore) -> None:
    payloads = [b"one", b"two" * 100, b"three" * 1000]
    refs = {object_store.put_stream(io.BytesIO(p)).digest: len(p) for p in payloads}
    object_store.put_bytes("manifests/m1.json", b"{}")  # documents are not blobs
    unknown = sha256_of(b"never stored")

    listed = {ref.digest: ref.size_bytes for ref in object_store.list_blobs()}
    stat = object_store.stat(sha256_of(b"two" * 100))
    first = sha256_of(b"one")
    object_store.delete(first)
    object_store.delete(first)  # idempotent

    assert listed == refs
    assert stat is not None
    assert stat.size_bytes == 300
    assert not object_store.exists(unknown)
    assert object_store.stat(unknown) is None
    assert not object_store.exists(first)
    assert object_store.stat(first) is None
    assert {ref.digest for ref in object_store.list_blobs()} == set(refs) - {first}


def test_get_missing_blob_raises_not_found(object_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError):
        object_store.get_to_file(sha256_of(b"absent"), tmp_path / "x")

    assert list(tmp_path.iterdir()) == []


def test_documents_round_trip(object_store: ObjectStore) -> None:
    object_store.put_bytes("manifests/run-1.json", b'{"v": 1}')
    object_store.put_bytes("manifests/run-1.json", b'{"v": 2}')  # documents may change

    assert object_store.get_bytes("manifests/run-1.json") == b'{"v": 2}'
    with pytest.raises(ObjectNotFoundError):
        object_store.get_bytes("manifests/absent.json")
    for reserved in ["blobs/sha256/abc", "staging/x", "/abs", ""]:
        with pytest.raises(ValueError, match="reserved"):
            object_store.put_bytes(reserved, b"{}")
