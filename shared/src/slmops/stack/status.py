"""`slmops down` and `slmops status` from the state file alone (any process can run them)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from slmops.stack.components import ComponentKind, probe
from slmops.stack.state import (
    ComponentRecord,
    Report,
    StackState,
    find_process,
    find_supervisor,
    read_state,
    remove_state,
    state_path,
    stop_components,
    write_state,
)

#: After SIGKILL, how long to wait for the supervisor to disappear.
_SUPERVISOR_KILL_WAIT_S = 5.0


def _stop_supervisor(
    state: StackState, timeout_s: float, report: Report, force: threading.Event | None
) -> None:
    """SIGTERM the recorded supervisor and wait while it stops what it started (each stop
    group may take ``timeout_s``), so it cannot restart what `down` stops; SIGKILL it if it
    takes longer or ``force`` is set."""
    supervisor = find_supervisor(state)
    if supervisor is None or supervisor.pid == os.getpid():
        return
    report(f"stopping the supervisor (pid {supervisor.pid}); it stops what it started")
    with contextlib.suppress(psutil.Error):
        supervisor.terminate()
    groups = sum(1 for r in state.components if r.kind is not ComponentKind.SERVICE) + 1
    deadline = time.monotonic() + timeout_s * groups + 10.0
    while _running(supervisor) and time.monotonic() < deadline:
        if force is not None and force.is_set():
            break
        time.sleep(0.05)
    if _running(supervisor):
        report(f"the supervisor (pid {supervisor.pid}) is still running: SIGKILL")
        with contextlib.suppress(psutil.Error):
            supervisor.kill()
        with contextlib.suppress(psutil.Error):
            supervisor.wait(_SUPERVISOR_KILL_WAIT_S)


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_stack(
    var_dir: Path, timeout_s: float, report: Report, force: threading.Event | None = None
) -> bool:
    """`slmops down`: stop the supervisor (which stops its components), then every recorded
    process still running; remove the state file. False if nothing was recorded."""
    path = state_path(var_dir.resolve())
    state = read_state(path)
    if state is None:
        return False
    _stop_supervisor(state, timeout_s, report, force)
    state = read_state(path)  # what the supervisor left, if anything
    if state is None:
        return True
    state.stopping = True
    write_state(path, state)
    stop_components(state.components, timeout_s, report, force)
    remove_state(path)
    return True


@dataclass(frozen=True)
class ComponentStatus:
    """One component as `slmops status` reports it."""

    name: str
    kind: ComponentKind
    pid: int
    alive: bool
    ready: bool
    url: str
    urls: dict[str, str]
    detail: str
    body: object
    log_path: str
    restarts: int = 0
    last_exit: str | None = None
    last_exit_at: float | None = None
    restart_at: float | None = None


@dataclass(frozen=True)
class SupervisorStatus:
    """The process that restarts components (`slmops up` or its detached supervisor)."""

    pid: int | None
    alive: bool
    detached: bool
    log_path: str | None


def supervisor_status(var_dir: Path) -> SupervisorStatus | None:
    """The recorded supervisor; None if there is no state file."""
    state = read_state(state_path(var_dir.resolve()))
    if state is None:
        return None
    alive = find_supervisor(state) is not None
    return SupervisorStatus(state.supervisor_pid, alive, state.detached, state.supervisor_log)


def _not_running_detail(record: ComponentRecord) -> str:
    if record.restart_at is not None:
        wait_s = max(0.0, record.restart_at - time.time())
        return f"exited ({record.last_exit}); restarting in {wait_s:.0f} s"
    return "process not running"


def stack_status(var_dir: Path, timeout_s: float = 2.0) -> list[ComponentStatus] | None:
    """Probe every recorded component; None if there is no state file."""
    state = read_state(state_path(var_dir.resolve()))
    if state is None:
        return None
    result = []
    for record in state.components:
        alive = find_process(record) is not None
        if alive:
            answer = probe(record.kind, record.ready_url, timeout_s)
            ready, detail, body = answer.ready, answer.detail, answer.body
        else:
            ready, detail, body = False, _not_running_detail(record), None
        main_url = record.urls.get(record.kind.value) or record.urls.get("http", "")
        result.append(
            ComponentStatus(
                name=record.name,
                kind=record.kind,
                pid=record.pid,
                alive=alive,
                ready=ready,
                url=main_url,
                urls=record.urls,
                detail=detail,
                body=body,
                log_path=record.log_path,
                restarts=record.restarts,
                last_exit=record.last_exit,
                last_exit_at=record.last_exit_at,
                restart_at=record.restart_at,
            )
        )
    return result


#: `slmops status` warns when a stream or bucket holds this share of its size cap.
WARN_SHARE = 0.8


@dataclass(frozen=True)
class StorageUse:
    """One JetStream stream (KV buckets are streams ``KV_<bucket>``) against its cap."""

    name: str
    bytes: int
    max_bytes: int  # -1: no cap
    messages: int
    replicas: int

    @property
    def share(self) -> float | None:
        return self.bytes / self.max_bytes if self.max_bytes > 0 else None

    def warning(self) -> str | None:
        share = self.share
        if share is None:
            return f"{self.name} has no size cap"
        if share >= WARN_SHARE:
            return (f"{self.name} holds {share:.0%} of its {self.max_bytes / 2**30:g} GiB cap: "
                    "raise SLMOPS_STREAM_MAX_GB or its retention will drop (or, for the event "
                    "log, refuse) messages")  # fmt: skip
        return None


def storage_use(components: list[ComponentStatus], timeout_s: float = 2.0) -> list[StorageUse]:
    """Every stream's size and cap from NATS's monitoring endpoint (``/jsz``); empty when NATS
    is not part of the stack or not answering."""
    import httpx

    # a cluster's nodes all hold every (replicated) stream: ask the first one that is ready
    monitor = next((c.urls.get("monitor") for c in components
                    if c.kind is ComponentKind.NATS and c.ready), None)  # fmt: skip
    if not monitor:
        return []
    try:
        answer = httpx.get(f"{monitor}/jsz", params={"streams": "true", "config": "true"},
                           timeout=timeout_s, trust_env=False)  # fmt: skip
        details = answer.json().get("account_details") or []
    except (httpx.HTTPError, ValueError):
        return []
    return sorted(
        (StorageUse(name=s["name"], bytes=s["state"]["bytes"],
                    max_bytes=s["config"].get("max_bytes", -1),
                    messages=s["state"]["messages"],
                    replicas=s["config"].get("num_replicas", 1))
         for account in details for s in account.get("stream_detail") or []),
        key=lambda use: use.name,
    )  # fmt: skip


def _epoch_iso(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, UTC).isoformat()


def status_json(
    components: list[ComponentStatus] | None,
    storage: list[StorageUse] | None = None,
    supervisor: SupervisorStatus | None = None,
) -> dict[str, object]:
    """The `slmops status --json` document."""
    items = components or []
    uses = storage or []
    return {
        "running": components is not None,
        "ready": bool(items) and all(item.ready for item in items),
        "supervisor": None
        if supervisor is None
        else {
            "pid": supervisor.pid,
            "alive": supervisor.alive,
            "detached": supervisor.detached,
            "log": supervisor.log_path,
        },
        "storage": [{**vars(u), "share": u.share} for u in uses],
        "warnings": [w for u in uses if (w := u.warning())],
        "components": {
            item.name: {
                "kind": item.kind.value,
                "pid": item.pid,
                "alive": item.alive,
                "ready": item.ready,
                "url": item.url,
                "urls": item.urls,
                "detail": item.detail,
                "body": item.body,
                "log": item.log_path,
                "restarts": item.restarts,
                "last_exit": None
                if item.last_exit is None
                else {
                    "reason": item.last_exit,
                    "at": _epoch_iso(item.last_exit_at),
                },
                "restart_at": _epoch_iso(item.restart_at),
            }
            for item in items
        },
    }


def stack_urls(document: Mapping[str, Any]) -> dict[str, str]:
    """Where a running stack listens, from its `slmops status --json` document: each
    service's base URL by name, and ``nats`` (comma separated URLs of a cluster's nodes)."""
    components = document["components"]
    nats = [c["urls"] for c in components.values() if c["kind"] == ComponentKind.NATS.value]
    urls = {name: c["urls"].get("http", "") for name, c in components.items()
            if c["kind"] != ComponentKind.NATS.value}  # fmt: skip
    urls["nats"] = nats[0].get("cluster") or nats[0]["nats"]  # every node's, on a cluster
    return urls
