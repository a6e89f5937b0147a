"""Every service distribution starts, connects and reports its health the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import entry_points

import httpx
import pytest

from slmops.auth import LocalCredentials, scopes_of_role
from slmops.testing.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVICES = sorted(ep.name for ep in entry_points(group="slmops.services"))


@pytest.fixture
def run_service() -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def run(name: str, env: dict[str, str]) -> str:
        port = free_port()
        service_env = {
            **os.environ, **env,
            f"SLMOPS_{name.upper()}_HOST": "127.0.0.1",
            f"SLMOPS_{name.upper()}_PORT": str(port),
        }  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", f"slmops_{name}"], env=service_env))
        return f"http://127.0.0.1:{port}"

    yield run
    for proc in procs:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal it got
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), "no clean shutdown on SIGTERM"


def poll(url: str, *, until_status: int, timeout_s: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=2)
            if last.status_code == until_status:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} never answered {until_status}; last: {last and last.text}")


def test_all_seven_services_are_installed() -> None:
    assert SERVICES == [
        "console", "gateway", "optimizer", "registry", "rollout", "telemetry", "validator",
    ]  # fmt: skip


@pytest.mark.parametrize("service", SERVICES)
def test_service_becomes_ready_with_nats_and_s3(
    service: str,
    platform_env: dict[str, str],
    run_service: object,
    credentials: LocalCredentials,
) -> None:
    base = run_service(service, platform_env)  # type: ignore[operator]

    # The optimizer is ready once its in-process Ray Serve runs: ~15 s alone, more when busy.
    ready = poll(
        f"{base}/readyz", until_status=200, timeout_s=120 if service == "optimizer" else 30
    )
    ready = ready.json()
    alive = httpx.get(f"{base}/healthz").json()
    anonymous = httpx.get(f"{base}/v1/runtime")
    viewer = credentials.issuer().mint("user:viewer", scopes_of_role("viewer"), ttl_s=60)
    runtime = httpx.get(f"{base}/v1/runtime", headers={"Authorization": f"Bearer {viewer}"})
    assert (anonymous.status_code, runtime.status_code) == (401, 200), anonymous.text
    runtime = runtime.json()

    assert alive == {"status": "alive", "service": service, "version": "0.1.0"}
    assert ready["ready"] is True
    assert ready["not_ready"] == []
    assert ready["checks"]["nats"]["ok"]
    assert ready["checks"]["topology"]["ok"]
    # The gateway downloads over presigned URLs, the console reads through the APIs, telemetry
    # keeps its view in KV.
    assert ("object_store" in ready["checks"]) == (
        service not in ("gateway", "console", "telemetry")
    )
    # The console is ready once it listens to the events that keep its pages live.
    assert ("live_feed" in ready["checks"]) == (service == "console")
    assert runtime["service"] == service
    assert runtime["source"] == f"/slmops/{service}"


def test_readiness_names_the_missing_dependencies(
    platform_env: dict[str, str], run_service: object
) -> None:
    closed = free_port()  # nothing listens there
    env = {
        **platform_env,
        "SLMOPS_NATS_URL": f"nats://someone:s3cret@127.0.0.1:{closed}",
        "SLMOPS_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
    }
    base = run_service("registry", env)  # type: ignore[operator]

    alive = poll(f"{base}/healthz", until_status=200)
    not_ready = poll(f"{base}/readyz", until_status=503).json()

    assert alive.json()["status"] == "alive"
    assert set(not_ready["not_ready"]) == {
        "nats", "topology", "consumers", "object_store", "gateway_reports",
    }  # fmt: skip
    assert not_ready["checks"]["nats"]["detail"].startswith("not connected")
    assert f"127.0.0.1:{closed}" in not_ready["checks"]["object_store"]["detail"]
    # readiness answers anyone: it never echoes a URL's credentials
    assert "s3cret" not in json.dumps(not_ready)
