"""A real registry process for the CLI tests (``python -m slmops_registry`` on a free port)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slmops.auth import LocalCredentials
from slmops.testing.ports import free_port


@pytest.fixture
def registry_url(platform_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        **platform_env,
        "SLMOPS_REGISTRY_HOST": "127.0.0.1",
        "SLMOPS_REGISTRY_PORT": str(port),
    }
    log_path = tmp_path / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slmops_registry"], env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry never got ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(autouse=True)
def cli_credentials(monkeypatch: pytest.MonkeyPatch, credentials: LocalCredentials) -> None:
    """The CLI calls as the local stack's admin, as it does after `slmops up`."""
    monkeypatch.setenv("SLMOPS_AUTH_TOKEN_FILE", str(credentials.token_file("admin")))
