"""A client that disconnects halfway through an upload leaves nothing behind (real server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slmops.objectstore import ObjectStore
from slmops.settings import PlatformSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def test_truncated_upload_stores_nothing_and_leaves_no_temp_file(
    registry_process: str, platform_env: dict[str, str]
) -> None:
    port = int(registry_process.rsplit(":", 1)[1])
    spool = Path(platform_env["SLMOPS_VAR_DIR"]) / "registry" / "spool"
    head = (
        "POST /v1/blobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
    )

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode() + b"\x01" * 400_000)  # 40% of what was announced
        time.sleep(0.5)
    time.sleep(1.0)  # let the server notice the disconnect
    health = httpx.get(f"{registry_process}/healthz", timeout=5)

    store = ObjectStore.from_settings(PlatformSettings(**{
        k.removeprefix("SLMOPS_").lower(): v for k, v in platform_env.items()
    }))  # fmt: skip
    assert list(store.list_blobs()) == []
    assert list(store.list_objects("staging/")) == []
    assert spool.is_dir()  # the upload did start spooling
    assert list(spool.iterdir()) == []
    assert health.status_code == 200  # the service stays up
