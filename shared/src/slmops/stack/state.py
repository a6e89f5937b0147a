"""The state file (``<var_dir>/stack.json``) and stopping recorded processes safely.

A recorded process is only ever signalled if psutil confirms its PID still belongs to a process
with the recorded create time, so a PID reused by an unrelated process is never touched.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from slmops.stack.components import ComponentKind, StackError

STATE_FILE_NAME = "stack.json"
STATE_VERSION = 1
#: Two create times closer than this are the same process. psutil derives a create time from
#: the boot time in /proc/stat, which moves when the VM's wall clock is stepped: two readings
#: of one process have differed by more than 50 ms here (every component looked dead to
#: `slmops status` while running). A PID reused within a second is not a real risk.
_CREATE_TIME_TOLERANCE_S = 1.0
#: After SIGKILL, how long to wait for a process to disappear.
_KILL_WAIT_S = 5.0

Report = Callable[[str], None]


@dataclass
class ComponentRecord:
    """One started process, as the state file records it."""

    name: str
    kind: ComponentKind
    pid: int
    create_time: float
    argv: list[str]
    urls: dict[str, str]
    ready_url: str
    log_path: str
    started_at: float
    #: How often the supervisor started it again after it exited.
    restarts: int = 0
    #: Why it last exited (``exit code 3``, ``SIGKILL``) and when (epoch seconds).
    last_exit: str | None = None
    last_exit_at: float | None = None
    #: When the supervisor starts it again (epoch seconds) while it waits out its backoff.
    restart_at: float | None = None
    #: The backoff before the latest (or pending) restart, in seconds.
    backoff_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComponentRecord:
        return cls(
            name=str(data["name"]),
            kind=ComponentKind(data["kind"]),
            pid=int(data["pid"]),
            create_time=float(data["create_time"]),
            argv=[str(arg) for arg in data["argv"]],
            urls={str(k): str(v) for k, v in data["urls"].items()},
            ready_url=str(data["ready_url"]),
            log_path=str(data["log_path"]),
            started_at=float(data["started_at"]),
            restarts=int(data.get("restarts", 0)),
            last_exit=_optional_str(data.get("last_exit")),
            last_exit_at=_optional_float(data.get("last_exit_at")),
            restart_at=_optional_float(data.get("restart_at")),
            backoff_s=float(data.get("backoff_s", 0.0)),
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass
class StackState:
    """Contents of the state file: the started components, in start order."""

    var_dir: str
    #: The `slmops up` process (foreground) or detached supervisor that owns the components
    #: and restarts them; None in state files of older versions.
    supervisor_pid: int | None = None
    supervisor_create_time: float | None = None
    #: Whether the supervisor runs detached (`slmops up --detach`), and where it logs.
    detached: bool = False
    supervisor_log: str | None = None
    #: Set once every component was started and ready (what `up --detach` waits for).
    ready: bool = False
    #: Set by whoever stops the stack, so nothing restarts what is being stopped.
    stopping: bool = False
    components: list[ComponentRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "var_dir": self.var_dir,
            "supervisor_pid": self.supervisor_pid,
            "supervisor_create_time": self.supervisor_create_time,
            "detached": self.detached,
            "supervisor_log": self.supervisor_log,
            "ready": self.ready,
            "stopping": self.stopping,
            "components": [record.to_json() for record in self.components],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackState:
        supervisor = data.get("supervisor_pid")
        return cls(
            var_dir=str(data["var_dir"]),
            supervisor_pid=int(supervisor) if supervisor is not None else None,
            supervisor_create_time=_optional_float(data.get("supervisor_create_time")),
            detached=bool(data.get("detached", False)),
            supervisor_log=_optional_str(data.get("supervisor_log")),
            # an older state file records only started (hence ready) components
            ready=bool(data.get("ready", True)),
            stopping=bool(data.get("stopping", False)),
            components=[ComponentRecord.from_json(item) for item in data["components"]],
        )


def state_path(var_dir: Path) -> Path:
    """Where the state file of the stack under ``var_dir`` lives."""
    return var_dir / STATE_FILE_NAME


def read_state(path: Path) -> StackState | None:
    """The state file's contents, None if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return StackState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StackError(
            f"state file {path} is unreadable ({exc}); check no process it lists is still "
            "running, then delete it"
        ) from exc


def write_state(path: Path, state: StackState) -> None:
    """Replace the state file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def remove_state(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def find_pid(pid: int, create_time: float) -> psutil.Process | None:
    """The process ``pid`` if it is still running and was created at ``create_time``."""
    try:
        proc = psutil.Process(pid)
        actual = float(proc.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None
    if abs(actual - create_time) > _CREATE_TIME_TOLERANCE_S:
        return None  # the PID was reused by another process
    return proc if _alive(proc) else None


def find_process(record: ComponentRecord) -> psutil.Process | None:
    """The recorded process if it is still running and is the one recorded, else None."""
    return find_pid(record.pid, record.create_time)


def find_supervisor(state: StackState) -> psutil.Process | None:
    """The recorded supervisor if it is still running and is the one recorded, else None."""
    if state.supervisor_pid is None or state.supervisor_create_time is None:
        return None
    return find_pid(state.supervisor_pid, state.supervisor_create_time)


def live_records(state: StackState) -> list[ComponentRecord]:
    """The recorded components whose process is still running."""
    return [record for record in state.components if find_process(record) is not None]


def _signal(procs: Iterable[psutil.Process], kill: bool) -> None:
    for proc in procs:
        try:
            # psutil re-checks that the PID still names the same process before signalling.
            if kill:
                proc.kill()
            else:
                proc.terminate()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass


def _wait_gone(
    procs: list[psutil.Process], timeout_s: float, force: threading.Event | None
) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    alive = [proc for proc in procs if _alive(proc)]
    while alive and time.monotonic() < deadline and not (force and force.is_set()):
        time.sleep(0.05)
        alive = [proc for proc in alive if _alive(proc)]
    return alive


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return list(proc.children(recursive=True))
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _stop_group(
    records: list[ComponentRecord],
    timeout_s: float,
    report: Report,
    force: threading.Event | None,
) -> None:
    found = [(record, find_process(record)) for record in records]
    procs = {record.name: proc for record, proc in found if proc is not None}
    if not procs:
        return
    children = [child for proc in procs.values() for child in _children(proc)]
    report(f"stopping {', '.join(procs)}")
    _signal(procs.values(), kill=False)
    stubborn = _wait_gone(list(procs.values()), timeout_s, force)
    if stubborn:
        names = [name for name, proc in procs.items() if proc in stubborn]
        report(f"{', '.join(names)} still running after {timeout_s:g} s: SIGKILL")
        _signal(stubborn, kill=True)
        _wait_gone(stubborn, _KILL_WAIT_S, None)
    orphans = [child for child in children if _alive(child)]
    if orphans:
        _signal(orphans, kill=False)
        _signal(_wait_gone(orphans, min(timeout_s, 5.0), force), kill=True)


def stop_components(
    records: list[ComponentRecord],
    timeout_s: float,
    report: Report,
    force: threading.Event | None = None,
) -> None:
    """Stop recorded processes in reverse start order: SIGTERM, wait, then SIGKILL.

    Consecutive services stop together (all signalled, then waited for); S3 and NATS each on
    their own afterwards, so services can still drain into them. ``force`` set (a second
    Ctrl-C) cuts the waits short.
    """
    groups: list[list[ComponentRecord]] = []
    for record in reversed(records):
        if groups and record.kind is ComponentKind.SERVICE and groups[-1][0].kind is record.kind:
            groups[-1].append(record)
        else:
            groups.append([record])
    for group in groups:
        _stop_group(group, timeout_s, report, force)
