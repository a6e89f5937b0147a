"""The local stack (`slmops up/down/status`), driven through ``python -m slmops.stack``.

Every test uses its own var dir and free ports. The services run too once every installed
service has a ``__main__`` module; until then the CLI tests run NATS and S3 only.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
from botocore.config import Config

from slmops.auth.bususers import local_bus_users
from slmops.bus.credentials import NatsCredentials
from slmops.settings import PlatformSettings
from slmops.stack import (
    ComponentFailedError,
    ComponentKind,
    ComponentSpec,
    PortClaim,
    StackSettings,
    Supervisor,
    discover_services,
    exit_reason,
    plan_stack,
    start_stack,
)
from slmops.stack import components as components_module
from slmops.stack.state import (
    ComponentRecord,
    StackState,
    find_process,
    read_state,
    state_path,
    stop_components,
    write_state,
)
from slmops.testing.localstack import stack_env_vars
from slmops.testing.polling import until
from slmops.testing.ports import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [sys.executable, "-m", "slmops.stack"]


def _runnable_services() -> list[str]:
    """Installed services that can run (have a ``__main__``), in start order."""
    return [
        name
        for name in discover_services()
        if importlib.util.find_spec(f"slmops_{name}.__main__") is not None
    ]


SERVICES = _runnable_services()


@pytest.fixture
def stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Env of the CLI subprocesses; this process gets the same, so its settings match."""
    for key in list(os.environ):
        if key.startswith("SLMOPS_"):
            monkeypatch.delenv(key)
    stack_vars = {
        # the optimizer is ready once its in-process Ray Serve runs (~20 s; more when busy)
        **stack_env_vars(tmp_path / "var", ready_timeout_s=120),
        "SLMOPS_STACK_STOP_TIMEOUT_S": "10",
        "SLMOPS_STACK_SERVICES": ",".join(SERVICES),
    }
    for key, value in stack_vars.items():
        monkeypatch.setenv(key, value)
    env = dict(os.environ)
    yield env
    # Whatever a test left behind: `down` stops only what the state file records.
    subprocess.run([*CLI, "down"], env=env, capture_output=True, timeout=60, check=False)


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _state_file(env: dict[str, str]) -> Path:
    return state_path(Path(env["SLMOPS_VAR_DIR"]))


def _recorded(env: dict[str, str]) -> list[tuple[str, int, float]]:
    state = read_state(_state_file(env))
    assert state is not None
    return [(r.name, r.pid, r.create_time) for r in state.components]


def _alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        same = abs(float(proc.create_time()) - create_time) < 1.0  # see _CREATE_TIME_TOLERANCE_S
        return same and bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _s3(env: dict[str, str]) -> Any:
    settings = PlatformSettings()
    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{env['SLMOPS_STACK_S3_PORT']}",
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


async def _jetstream(env: dict[str, str], create: bool) -> list[str]:
    import nats

    # As the admin: the stack's NATS refuses anonymous clients, and only the admin may
    # create streams.
    admin = NatsCredentials.from_seed_file(
        local_bus_users(Path(env["SLMOPS_VAR_DIR"])).seed_file("admin")
    )
    client = await nats.connect(
        f"nats://127.0.0.1:{env['SLMOPS_STACK_NATS_PORT']}",
        nkeys_seed_str=admin.nkey_seed, inbox_prefix=admin.inbox_prefix,
    )  # fmt: skip
    try:
        js = client.jetstream()
        if create:
            await js.add_stream(name="STACKTEST", subjects=["stacktest.>"])
            await js.publish("stacktest.hello", b"kept")
        info = await js.stream_info("STACKTEST")
        return [info.config.name or "", str(info.state.messages)]
    finally:
        await client.close()


def _assert_ready(env: dict[str, str]) -> dict[str, Any]:
    result = _cli(env, "status", "--json", timeout=30)
    document: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == 0, (document, result.stderr)
    assert document["ready"] is True
    assert list(document["components"]) == ["nats", "s3", *SERVICES]
    for name, item in document["components"].items():
        assert item["alive"], name
        assert item["ready"], name
    return document


def test_up_status_down_keeps_s3_and_jetstream_data(stack_env: dict[str, str]) -> None:
    up = _cli(stack_env, "up", "--detach")
    assert up.returncode == 0, up.stderr
    assert f"nats://127.0.0.1:{stack_env['SLMOPS_STACK_NATS_PORT']}" in up.stdout
    document = _assert_ready(stack_env)
    for name in SERVICES:
        assert document["components"][name]["url"].startswith("http://127.0.0.1:")
    # every stream and bucket the services declared, each with a cap, none near it
    storage = {use["name"]: use for use in document["storage"]}
    assert {"SLMOPS_PIPELINE", "SLMOPS_FLEET", "KV_slmops-desired-state"} <= set(storage)
    assert all(use["max_bytes"] > 0 for use in storage.values()), storage
    assert document["warnings"] == []
    # the credentials `up` minted: the CLI is the admin, each service has its own token
    tokens = Path(stack_env["SLMOPS_VAR_DIR"]) / "auth" / "tokens"
    assert {f"service-{name}.jwt" for name in SERVICES if name != "gateway"} <= {
        p.name for p in tokens.iterdir()
    }

    again = _cli(stack_env, "up", "--detach", timeout=30)
    assert again.returncode != 0
    assert "already running" in again.stderr

    bucket = PlatformSettings().s3_bucket  # `up` creates it
    _s3(stack_env).put_object(Bucket=bucket, Key="stack-test/hello.txt", Body=b"survives")
    assert asyncio.run(_jetstream(stack_env, create=True)) == ["STACKTEST", "1"]

    recorded = _recorded(stack_env)
    assert [name for name, _, _ in recorded] == ["nats", "s3", *SERVICES]
    down = _cli(stack_env, "down", timeout=60)
    assert down.returncode == 0, down.stderr
    assert not _state_file(stack_env).exists()
    assert [name for name, pid, ct in recorded if _alive(pid, ct)] == []
    assert _cli(stack_env, "status", timeout=30).returncode == 1

    up = _cli(stack_env, "up", "--detach")
    assert up.returncode == 0, up.stderr
    _assert_ready(stack_env)
    body = _s3(stack_env).get_object(Bucket=bucket, Key="stack-test/hello.txt")["Body"].read()
    assert body == b"survives"
    assert asyncio.run(_jetstream(stack_env, create=False)) == ["STACKTEST", "1"]

    recorded = _recorded(stack_env)
    assert _cli(stack_env, "down", timeout=60).returncode == 0
    assert [name for name, pid, ct in recorded if _alive(pid, ct)] == []


def test_taken_port_fails_fast_and_starts_nothing(stack_env: dict[str, str]) -> None:
    port = int(stack_env["SLMOPS_STACK_NATS_PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        started = time.monotonic()
        up = _cli(stack_env, "up", "--detach", timeout=30)
        elapsed = time.monotonic() - started
    assert up.returncode != 0
    assert elapsed < 10
    assert str(port) in up.stderr
    assert "SLMOPS_STACK_NATS_PORT" in up.stderr
    assert "nats" in up.stderr
    assert not _state_file(stack_env).exists()
    assert not (Path(stack_env["SLMOPS_VAR_DIR"]) / "logs" / "nats.log").exists()


def test_down_and_status_with_nothing_running(stack_env: dict[str, str]) -> None:
    down = _cli(stack_env, "down", timeout=30)
    assert down.returncode == 0
    assert "nothing running" in down.stdout
    status = _cli(stack_env, "status", "--json", timeout=30)
    assert status.returncode == 1
    assert json.loads(status.stdout) == {
        "running": False,
        "ready": False,
        "supervisor": None,
        "components": {},
        "storage": [],
        "warnings": [],
    }


def test_plan_gives_services_their_ports_and_platform_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(components_module, "discover_services", lambda: ["registry", "zeta"])
    monkeypatch.setattr(components_module, "_check_runnable", lambda name: None)
    platform = PlatformSettings(var_dir=tmp_path)
    settings = StackSettings(nats_port=1111, s3_port=2222, service_base_port=3000)
    specs = plan_stack(settings, platform)
    assert [spec.name for spec in specs] == ["nats", "s3", "registry", "zeta"]
    assert "-js" in specs[0].argv
    assert specs[0].argv[specs[0].argv.index("-sd") + 1] == str(tmp_path.resolve() / "nats")
    assert specs[1].argv[specs[1].argv.index("--host") + 1] == "127.0.0.1"
    zeta = specs[3]
    assert zeta.argv == (sys.executable, "-m", "slmops_zeta")
    assert zeta.env["SLMOPS_ZETA_HOST"] == "127.0.0.1"
    assert zeta.env["SLMOPS_ZETA_PORT"] == "3001"
    assert zeta.env["SLMOPS_NATS_URL"] == "nats://127.0.0.1:1111"
    assert zeta.env["SLMOPS_S3_ENDPOINT_URL"] == "http://127.0.0.1:2222"
    assert zeta.env["SLMOPS_ENV"] == "local"
    assert zeta.env["SLMOPS_TRACE_DIR"] == str(tmp_path.resolve() / "traces")
    assert zeta.ready_url == "http://127.0.0.1:3001/readyz"
    # every service calls the registry where this stack serves it, not at its default port
    assert zeta.env["SLMOPS_ZETA_REGISTRY_URL"] == "http://127.0.0.1:3000"
    assert "REGISTRY_URL" not in zeta.env
    assert [s.name for s in plan_stack(StackSettings(services=""), platform)] == ["nats", "s3"]
    assert [s.name for s in plan_stack(StackSettings(services="zeta"), platform)][-1] == "zeta"


_FAKE_SERVICE = textwrap.dedent(
    """
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    ready_at = time.monotonic() + float(sys.argv[1])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ready = time.monotonic() >= ready_at
            body = json.dumps({"not_ready": [] if ready else ["nats-consumer"]}).encode()
            self.send_response(200 if ready else 503)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            print("request", self.path, flush=True)

    HTTPServer(("127.0.0.1", int(os.environ["SLMOPS_FAKE_PORT"])), Handler).serve_forever()
    """
)


def _fake_spec(tmp_path: Path, ready_after_s: float) -> ComponentSpec:
    script = tmp_path / "fake_service.py"
    script.write_text(_FAKE_SERVICE)
    (port,) = free_ports(1)
    return ComponentSpec(
        name="fake",
        kind=ComponentKind.SERVICE,
        argv=(sys.executable, str(script), str(ready_after_s)),
        ports=(PortClaim(port, "HTTP port of service fake", "SLMOPS_STACK_SERVICE_BASE_PORT"),),
        urls={"http": f"http://127.0.0.1:{port}", "docs": f"http://127.0.0.1:{port}/docs"},
        ready_url=f"http://127.0.0.1:{port}/readyz",
        env={"SLMOPS_FAKE_PORT": str(port)},
    )


def test_service_waits_for_readyz_and_stops(tmp_path: Path) -> None:
    platform = PlatformSettings(var_dir=tmp_path)
    settings = StackSettings(ready_timeout_s=10, stop_timeout_s=5)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = StackState(var_dir=str(tmp_path), components=[_record("old", dead.pid, time.time())])
    write_state(state_path(tmp_path), stale)
    reports: list[str] = []
    running = start_stack([_fake_spec(tmp_path, 0.5)], settings, platform, reports.append)
    assert any("stale state file" in line for line in reports)
    record = running.state.components[0]
    assert _alive(record.pid, record.create_time)
    assert "request /readyz" in (tmp_path / "logs" / "fake.log").read_text()
    assert read_state(state_path(tmp_path)) == running.state
    running.stop()
    assert not _alive(record.pid, record.create_time)
    assert not state_path(tmp_path).exists()


def test_service_not_ready_in_time_reports_readyz_body(tmp_path: Path) -> None:
    platform = PlatformSettings(var_dir=tmp_path)
    settings = StackSettings(ready_timeout_s=1.5, stop_timeout_s=5)
    spec = _fake_spec(tmp_path, 3600)
    with pytest.raises(ComponentFailedError, match="nats-consumer") as failed:
        start_stack([spec], settings, platform, lambda _: None)
    assert "request /readyz" in failed.value.log_tail
    assert not state_path(tmp_path).exists()
    # It was stopped: its port is free again.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", spec.ports[0].port))


def test_component_exiting_early_reports_its_log(tmp_path: Path) -> None:
    platform = PlatformSettings(var_dir=tmp_path)
    spec = _fake_spec(tmp_path, 0)
    spec = ComponentSpec(
        name="crashy",
        kind=ComponentKind.SERVICE,
        argv=(sys.executable, "-c", "import sys; print('boom: no config'); sys.exit(3)"),
        ports=spec.ports,
        urls=spec.urls,
        ready_url=spec.ready_url,
    )
    with pytest.raises(ComponentFailedError, match="crashy exited with code 3") as failed:
        start_stack([spec], StackSettings(ready_timeout_s=10), platform, lambda _: None)
    assert "boom: no config" in failed.value.log_tail
    assert not state_path(tmp_path).exists()


def _record(name: str, pid: int, create_time: float) -> ComponentRecord:
    return ComponentRecord(
        name=name,
        kind=ComponentKind.SERVICE,
        pid=pid,
        create_time=create_time,
        argv=["x"],
        urls={},
        ready_url="http://127.0.0.1:1/readyz",
        log_path="x.log",
        started_at=create_time,
    )


def test_a_reused_pid_is_never_signalled() -> None:
    me = psutil.Process()
    reused = _record("reused", me.pid, float(me.create_time()) - 1000)
    assert find_process(reused) is None
    stop_components([reused], 0.1, lambda _: None)  # would SIGTERM this very test otherwise
    assert find_process(_record("me", me.pid, float(me.create_time()))) is not None


# --- supervision: what exits is started again -------------------------------------------------


def _state(var_dir: Path) -> StackState:
    state = read_state(state_path(var_dir))
    assert state is not None
    return state


def _component(var_dir: Path, name: str) -> ComponentRecord:
    return next(r for r in _state(var_dir).components if r.name == name)


def _ready_again(var_dir: Path, name: str, restarts: int) -> bool:
    record = _component(var_dir, name)
    return (
        record.restarts == restarts
        and record.restart_at is None
        and _alive(record.pid, record.create_time)
    )


def test_exit_reasons_name_signals_and_codes() -> None:
    assert exit_reason(-9) == "SIGKILL"
    assert exit_reason(-15) == "SIGTERM"
    assert exit_reason(3) == "exit code 3"


def test_a_state_file_of_an_older_version_still_loads(tmp_path: Path) -> None:
    old = {"version": 1, "var_dir": str(tmp_path), "supervisor_pid": None, "stopping": False,
           "components": [{"name": "nats", "kind": "nats", "pid": 1, "create_time": 1.0,
                           "argv": ["nats-server"], "urls": {}, "ready_url": "http://x",
                           "log_path": "nats.log", "started_at": 1.0}]}  # fmt: skip
    state_path(tmp_path).write_text(json.dumps(old))
    state = _state(tmp_path)
    assert state.ready
    assert state.supervisor_create_time is None
    (record,) = state.components
    assert (record.restarts, record.last_exit, record.restart_at) == (0, None, None)


async def test_a_component_that_exits_is_restarted_with_doubling_backoff(tmp_path: Path) -> None:
    platform = PlatformSettings(var_dir=tmp_path)
    settings = StackSettings(
        ready_timeout_s=10, stop_timeout_s=5, restart_backoff_initial_s=0.2,
        restart_backoff_max_s=0.3, restart_reset_after_s=3600,
    )  # fmt: skip
    spec = _fake_spec(tmp_path, 0)
    running = start_stack([spec], settings, platform, lambda _: None)
    stop = threading.Event()
    supervisor = Supervisor(running, [spec], poll_interval_s=0.05, stop=stop)
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    try:
        pids = []
        for restarts, backoff_s, how in ((1, 0.2, "kill"), (2, 0.3, "terminate"), (3, 0.3, "kill")):
            record = _component(tmp_path, "fake")
            pids.append(record.pid)
            getattr(psutil.Process(record.pid), how)()
            await until(lambda n=restarts: _ready_again(tmp_path, "fake", n),  # type: ignore[misc]
                        f"restart {restarts}", timeout_s=20)  # fmt: skip
            record = _component(tmp_path, "fake")
            assert record.backoff_s == pytest.approx(backoff_s)  # doubled, then capped
            assert record.last_exit == ("SIGKILL" if how == "kill" else "SIGTERM")
            assert record.last_exit_at is not None
            assert record.pid not in pids
        # the restarted process got the same env: it serves on the port the spec gave it
        await until(lambda: probe_ready(spec), "the restarted fake answers /readyz")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert not state_path(tmp_path).exists()  # stopping the supervisor stopped the stack
    assert not _alive(record.pid, record.create_time)
    banners = (tmp_path / "logs" / "fake.log").read_text().count("=== slmops up: fake")
    assert banners == 4


def probe_ready(spec: ComponentSpec) -> bool:
    from slmops.stack import probe

    return probe(spec.kind, spec.ready_url).ready


def _kill(env: dict[str, str], name: str, how: str = "kill") -> ComponentRecord:
    record = next(r for r in _state(Path(env["SLMOPS_VAR_DIR"])).components if r.name == name)
    getattr(psutil.Process(record.pid), how)()
    return record


def _status(env: dict[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_cli(env, "status", "--json", timeout=30).stdout)
    return document


async def test_the_detached_supervisor_restarts_a_killed_component(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**stack_env, "SLMOPS_STACK_SERVICES": ""}  # NATS and S3: seconds, not minutes
    monkeypatch.setenv("SLMOPS_STACK_SERVICES", "")
    var_dir = Path(env["SLMOPS_VAR_DIR"])
    up = _cli(env, "up", "--detach")
    assert up.returncode == 0, up.stderr
    supervisor = _state(var_dir)
    assert supervisor.detached
    assert supervisor.supervisor_pid is not None
    assert await _jetstream(env, create=True) == ["STACKTEST", "1"]

    killed = {"nats": _kill(env, "nats"), "s3": _kill(env, "s3", "terminate")}
    await until(lambda: all(_ready_again(var_dir, n, 1) for n in killed), "both restarted",
                timeout_s=30, every_s=0.1)  # fmt: skip
    document = _status(env)
    assert document["ready"] is True
    assert document["supervisor"]["alive"]
    assert document["supervisor"]["detached"]
    for name, reason in (("nats", "SIGKILL"), ("s3", "SIGTERM")):
        item = document["components"][name]
        assert item["restarts"] == 1
        assert item["last_exit"]["reason"] == reason
        assert item["last_exit"]["at"]
        assert item["pid"] != killed[name].pid
    # NATS restarted on the same store: the streams are still there
    assert await _jetstream(env, create=False) == ["STACKTEST", "1"]
    table = _cli({**env, "COLUMNS": "200"}, "status", timeout=30).stdout
    assert "SIGKILL" in table
    assert "restarts" in table

    recorded = _recorded(env)
    down = _cli(env, "down", timeout=60)
    assert down.returncode == 0, down.stderr
    assert "stopping the supervisor" in down.stderr
    assert not _alive(supervisor.supervisor_pid, supervisor.supervisor_create_time or 0.0)
    assert [name for name, pid, ct in recorded if _alive(pid, ct)] == []


async def test_down_while_a_component_waits_out_its_backoff_restarts_nothing(
    stack_env: dict[str, str],
) -> None:
    env = {**stack_env, "SLMOPS_STACK_SERVICES": "", "SLMOPS_STACK_RESTART_BACKOFF_INITIAL_S": "60"}
    var_dir = Path(env["SLMOPS_VAR_DIR"])
    up = _cli(env, "up", "--detach")
    assert up.returncode == 0, up.stderr
    _kill(env, "nats")
    await until(lambda: _component(var_dir, "nats").restart_at is not None,
                "the supervisor noted the exit", timeout_s=20, every_s=0.1)  # fmt: skip
    status = _status(env)
    assert status["components"]["nats"]["alive"] is False
    assert "restarting in" in status["components"]["nats"]["detail"]
    recorded = _recorded(env)
    down = _cli(env, "down", timeout=60)
    assert down.returncode == 0, down.stderr
    assert [name for name, pid, ct in recorded if _alive(pid, ct)] == []
    assert not state_path(var_dir).exists()
    log = (var_dir / "logs" / "nats.log").read_text()
    assert log.count("=== slmops up: nats") == 1  # started once, never again


def test_a_detached_start_that_fails_reports_why_and_leaves_nothing(
    stack_env: dict[str, str],
) -> None:
    env = {**stack_env, "SLMOPS_STACK_SERVICES": "", "SLMOPS_STACK_READY_TIMEOUT_S": "0.001"}
    up = _cli(env, "up", "--detach", timeout=60)
    assert up.returncode == 1
    assert "the supervisor exited with code 1" in up.stderr
    assert "was not ready within 0.001 s" in up.stderr  # from the supervisor's log
    assert "supervisor.log" in up.stderr
    assert not _state_file(env).exists()
