"""Starting the local stack.

:func:`start_stack` checks ports, starts each component in order, waits until it is ready and
records it in ``<var_dir>/stack.json``; any failure stops what was started and raises
:class:`StackError`. :mod:`slmops.stack.supervisor` then keeps it running; `slmops down` and
`slmops status` live in :mod:`slmops.stack.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

from slmops.auth import ensure_local_credentials
from slmops.auth.bususers import local_bus_users
from slmops.bus.connection import declare_topology
from slmops.bus.credentials import NatsCredentials
from slmops.bus.topology import Topology
from slmops.secretfiles import write_private
from slmops.settings import PlatformSettings
from slmops.stack.components import (
    ComponentKind,
    ComponentSpec,
    StackError,
    StackSettings,
    probe,
    stack_platform,
)
from slmops.stack.preflight import check_can_start, clear_stale_state, startup_lock
from slmops.stack.signals import Signals
from slmops.stack.state import (
    ComponentRecord,
    Report,
    StackState,
    remove_state,
    state_path,
    stop_components,
    write_state,
)

LOG_TAIL_LINES = 40


class ComponentFailedError(StackError):
    """A component exited or was not ready in time (everything started was stopped)."""

    def __init__(self, message: str, log_path: Path, log_tail: str) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = log_tail


def log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset``."""
    try:
        with path.open("rb") as log:
            log.seek(max(0, offset))
            data = log.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def ensure_bucket(platform: PlatformSettings, endpoint_url: str) -> None:
    """Create the platform bucket on the local S3 server unless it exists."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=platform.s3_region,
        aws_access_key_id=platform.s3_access_key_id.get_secret_value(),
        aws_secret_access_key=platform.s3_secret_access_key.get_secret_value(),
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=10,
            retries={"max_attempts": 3},
        ),
    )
    try:
        client.head_bucket(Bucket=platform.s3_bucket)
    except ClientError:
        try:
            client.create_bucket(Bucket=platform.s3_bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise StackError(f"cannot create bucket {platform.s3_bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StackError(f"cannot create bucket {platform.s3_bucket!r}: {exc}") from exc
    except BotoCoreError as exc:
        raise StackError(f"cannot reach the S3 server at {endpoint_url}: {exc}") from exc


@dataclass
class RunningStack:
    """The stack this process started: state file, child processes, how to stop them."""

    var_dir: Path
    stack: StackSettings
    platform: PlatformSettings
    report: Report
    signals: Signals = field(default_factory=Signals)
    popens: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_offsets: dict[str, int] = field(default_factory=dict)
    state: StackState = field(init=False)

    def __post_init__(self) -> None:
        me = psutil.Process()
        self.state = StackState(
            var_dir=str(self.var_dir),
            supervisor_pid=me.pid,
            supervisor_create_time=float(me.create_time()),
        )

    @property
    def state_file(self) -> Path:
        return state_path(self.var_dir)

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "logs"

    def record(self, name: str) -> ComponentRecord:
        """The state file's record of component ``name``."""
        return next(record for record in self.state.components if record.name == name)

    def _spawn(self, spec: ComponentSpec, why: str) -> tuple[subprocess.Popen[bytes], float]:
        """``spec``'s process (own session, output appended to its log) and its create time."""
        for path, text in spec.files.items():
            write_private(path, text)
        log_path = self.log_dir / f"{spec.name}.log"
        with log_path.open("ab") as log:
            self.log_offsets[spec.name] = log.tell()
            banner = f"=== slmops up: {spec.name} {why} at {datetime.now(UTC).isoformat()} ===\n"
            log.write(banner.encode())
            log.flush()
            try:
                popen = subprocess.Popen(
                    list(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **spec.env},
                    start_new_session=True,
                )
            except OSError as exc:
                raise StackError(f"cannot start {spec.name} ({spec.argv[0]}): {exc}") from exc
        self.popens[spec.name] = popen
        try:
            create_time = float(psutil.Process(popen.pid).create_time())
        except psutil.Error:
            create_time = time.time()  # it already exited; the readiness wait reports it
        return popen, create_time

    def start(self, spec: ComponentSpec) -> None:
        """Start ``spec``'s process and record it."""
        popen, create_time = self._spawn(spec, "starting")
        record = ComponentRecord(
            name=spec.name,
            kind=spec.kind,
            pid=popen.pid,
            create_time=create_time,
            argv=list(spec.argv),
            urls=dict(spec.urls),
            ready_url=spec.ready_url,
            log_path=str(self.log_dir / f"{spec.name}.log"),
            started_at=time.time(),
        )
        self.state.components.append(record)
        write_state(self.state_file, self.state)

    def restart(self, spec: ComponentSpec) -> None:
        """Start ``spec`` again (after it exited) with the same argv and env; its record gets
        the new PID and create time and one more restart."""
        record = self.record(spec.name)
        popen, create_time = self._spawn(spec, f"restart {record.restarts + 1}")
        record.pid, record.create_time, record.started_at = popen.pid, create_time, time.time()
        record.restarts += 1
        record.restart_at = None
        write_state(self.state_file, self.state)

    def failure(self, name: str, message: str) -> ComponentFailedError:
        log_path = self.log_dir / f"{name}.log"
        tail = log_tail(log_path, self.log_offsets.get(name, 0))
        return ComponentFailedError(message, log_path, tail)

    def wait_ready(self, spec: ComponentSpec, timeout_s: float) -> None:
        """Probe ``spec`` until ready; raise :class:`ComponentFailedError` if it exits or times
        out (the message carries the last probe answer, e.g. the service's /readyz body)."""
        popen = self.popens[spec.name]
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            code = popen.poll()
            if code is not None:
                raise self.failure(
                    spec.name, f"{spec.name} exited with code {code} before it was ready"
                )
            for name, earlier in self.popens.items():
                if earlier is not popen and (code := earlier.poll()) is not None:
                    raise self.failure(
                        name, f"{name} exited with code {code} while {spec.name} was starting"
                    )
            remaining = deadline - time.monotonic()
            result = probe(spec.kind, spec.ready_url, timeout_s=max(0.2, min(2.0, remaining)))
            if result.ready:
                return
            if time.monotonic() >= deadline:
                raise self.failure(
                    spec.name,
                    f"{spec.name} was not ready within {timeout_s:g} s "
                    f"(SLMOPS_STACK_READY_TIMEOUT_S); last answer from {spec.ready_url}: "
                    f"{result.detail}",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def stop(self) -> None:
        """Stop everything started (reverse order), reap the children, drop the state file."""
        self.signals.stopping = True
        if self.state.components and self.state_file.exists():
            self.state.stopping = True
            write_state(self.state_file, self.state)
        recorded = {record.name: record.pid for record in self.state.components}
        for name, popen in self.popens.items():
            # interrupted between starting (or restarting) it and recording it
            if recorded.get(name) != popen.pid and popen.poll() is None:
                popen.kill()
        stop_components(
            self.state.components, self.stack.stop_timeout_s, self.report, self.signals.force
        )
        for popen in self.popens.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=1.0)
        remove_state(self.state_file)

    def mark_ready(self) -> None:
        """Every component started and ready: what `slmops up --detach` waits for."""
        self.state.ready = True
        write_state(self.state_file, self.state)


def declare_platform_topology(platform: PlatformSettings, nats_url: str) -> None:
    """Streams and buckets are the admin's to create and change: declared here, before the
    services (whose identities may only find them) start."""
    admin = NatsCredentials.from_seed_file(
        local_bus_users(platform.var_dir.resolve()).seed_file("admin")
    )
    topology = Topology().sized(platform.jetstream_replicas, platform.stream_max_gb)
    asyncio.run(declare_topology(nats_url, topology, admin))


def prepare(spec: ComponentSpec, platform: PlatformSettings) -> None:
    """What a component needs once ready, before the services use it: the bucket on S3, the
    streams and buckets on NATS (both idempotent, so they run again after a restart)."""
    if spec.kind is ComponentKind.S3:
        ensure_bucket(platform, spec.urls["s3"])
    if spec.kind is ComponentKind.NATS:  # a cluster node: through any node of the cluster
        declare_platform_topology(platform, spec.urls.get("cluster") or spec.urls["nats"])


def start_groups(specs: list[ComponentSpec]) -> list[list[ComponentSpec]]:
    """Components started together before any is waited for: the nodes of a NATS cluster
    (one node alone never gets a JetStream meta leader); every other component alone."""
    groups: list[list[ComponentSpec]] = []
    for spec in specs:
        if groups and spec.kind is ComponentKind.NATS and groups[-1][-1].kind is spec.kind:
            groups[-1].append(spec)
        else:
            groups.append([spec])
    return groups


def start_stack(
    specs: list[ComponentSpec],
    stack: StackSettings,
    platform: PlatformSettings,
    report: Report,
    signals: Signals | None = None,
) -> RunningStack:
    """Start ``specs`` in order, each ready before the next; on any failure (or Ctrl-C) stop
    what was started and re-raise."""
    platform = stack_platform(stack, platform)
    var_dir = platform.var_dir.resolve()
    (var_dir / "logs").mkdir(parents=True, exist_ok=True)
    running = RunningStack(var_dir, stack, platform, report, signals or Signals())
    with startup_lock(var_dir):
        clear_stale_state(var_dir, report)
        check_can_start(specs, platform)
        ensure_local_credentials(var_dir)  # before the services that verify and send tokens
        try:
            for group in start_groups(specs):
                for spec in group:
                    report(f"starting {spec.name}")
                    running.start(spec)
                for spec in group:
                    running.wait_ready(spec, stack.ready_timeout_s)
                prepare(group[-1], platform)  # a cluster's topology is declared once
        except BaseException:
            running.stop()
            raise
    return running
