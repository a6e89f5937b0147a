"""A client that disconnects halfway through an upload leaves nothing behind (real server)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from slmops.auth import LocalCredentials
from slmops.objectstore import ObjectStore
from slmops.settings import PlatformSettings
from slmops.testing.ports import free_port
from slmops.testing.s3 import open_multipart_uploads

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def registry_process(platform_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        **platform_env,
        "SLMOPS_REGISTRY_HOST": "127.0.0.1",
        "SLMOPS_REGISTRY_PORT": str(port),
    }
    proc = subprocess.Popen([sys.executable, "-m", "slmops_registry"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError("registry did not become ready")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _until(what: str, check: Callable[[], None], *, timeout_s: float = 30) -> None:
    """``check()`` again every 0.1 s until it passes; past ``timeout_s`` its last failure,
    saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except AssertionError as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: not so after {timeout_s:g} s: {exc}") from exc
        time.sleep(0.1)


@pytest.mark.parametrize(
    "digest_header",
    ["", f"X-Expected-Digest: sha256:{hashlib.sha256(b'x' * 20_000_000).hexdigest()}\r\n"],
    ids=["spooled", "streamed-to-store"],
)
def test_truncated_upload_stores_nothing_and_leaves_no_temp_file(
    registry_process: str,
    platform_env: dict[str, str],
    digest_header: str,
    credentials: LocalCredentials,
) -> None:
    port = int(registry_process.rsplit(":", 1)[1])
    spool = Path(platform_env["SLMOPS_VAR_DIR"]) / "registry" / "spool"
    head = (
        "POST /v1/blobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {credentials.token('admin')}\r\n"
        f"Content-Type: application/octet-stream\r\n{digest_header}"
        "Content-Length: 20000000\r\n\r\n"
    )
    settings = PlatformSettings(**{
        k.removeprefix("SLMOPS_").lower(): v for k, v in platform_env.items()
    })  # fmt: skip
    store = ObjectStore.from_settings(settings)

    def spooled() -> list[Path]:
        return list(spool.iterdir()) if spool.exists() else []

    def upload_under_way() -> None:
        if digest_header:  # streamed: a multipart upload holds the first part
            assert open_multipart_uploads(settings) != [], "no multipart upload open"
        else:
            assert spooled() != [], f"no temp file in {spool}"

    def nothing_left() -> None:
        assert list(store.list_objects("")) == []
        assert open_multipart_uploads(settings) == []
        if digest_header:  # streamed straight into a multipart upload: aborted, never spooled
            assert not spool.exists()
        else:  # the upload did start spooling, and the temp file went with the client
            assert spool.is_dir()
            assert spooled() == []

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode() + b"x" * 12_000_000)  # more than a part, less than announced
        _until("the server receives the upload", upload_under_way)
    _until("the server cleans up after the disconnect", nothing_left)
    health = httpx.get(f"{registry_process}/healthz", timeout=5)
    assert health.status_code == 200  # the service stays up
