"""`slmops up`, `slmops down` and `slmops status`: the local stack (see :mod:`slmops.stack`).

Plain typer command functions; ``slmops.cli.main`` registers them with ``app.command(...)``.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from slmops.settings import PlatformSettings
from slmops.stack.components import (
    ComponentKind,
    StackError,
    StackSettings,
    plan_stack,
    stack_platform,
)
from slmops.stack.detached import DetachedSupervisor, supervisor_log_path
from slmops.stack.launcher import ComponentFailedError
from slmops.stack.preflight import check_can_start, clear_stale_state
from slmops.stack.signals import Signals
from slmops.stack.state import StackState, state_path
from slmops.stack.status import (
    ComponentStatus,
    StorageUse,
    stack_status,
    status_json,
    stop_stack,
    storage_use,
    supervisor_status,
)
from slmops.stack.supervisor import run_up

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _report(message: str) -> None:
    _err.print(message, markup=False, style="dim")


def _fail(message: str, code: int = 1) -> typer.Exit:
    _err.print(f"error: {message}", markup=False, style="red")
    return typer.Exit(code)


def _platform() -> PlatformSettings:
    try:
        return PlatformSettings()
    except ValidationError as exc:
        raise _fail(f"invalid SLMOPS_* settings: {exc}", 2) from exc


def _stack() -> StackSettings:
    try:
        return StackSettings()
    except ValidationError as exc:
        raise _fail(f"invalid SLMOPS_STACK_* settings: {exc}", 2) from exc


def _print_ready(state: StackState, platform: PlatformSettings, *, detach: bool) -> None:
    table = Table(title="slmops local stack", title_justify="left")
    table.add_column("component")
    table.add_column("pid", justify="right")
    table.add_column("listens on")
    for record in state.components:
        if record.kind is ComponentKind.NATS:
            where = f"{record.urls['nats']}\nmonitor {record.urls['monitor']}"
        elif record.kind is ComponentKind.S3:
            where = f"{record.urls['s3']} (bucket {platform.s3_bucket})"
        else:
            where = record.urls["docs"]
        table.add_row(record.name, str(record.pid), where)
    _out.print(table)
    var_dir = Path(state.var_dir)
    _out.print(f"logs:  {var_dir / 'logs'}", markup=False)
    _out.print(f"state: {state_path(var_dir)}", markup=False)
    if detach:
        _out.print(
            f"running in the background, supervised by pid {state.supervisor_pid} (it restarts "
            f"what exits; log {supervisor_log_path(var_dir)}); stop it with `slmops down`",
            markup=False,
        )
    else:
        _out.print("supervising: what exits is restarted; Ctrl-C stops the stack", markup=False)


_STOPPED = "--- stopped everything that was started ---"


def _component_failed(exc: ComponentFailedError) -> typer.Exit:
    _err.print(f"error: {exc}", markup=False, style="red")
    _err.print(f"--- last lines of {exc.log_path} ---", markup=False)
    _err.print(exc.log_tail, markup=False, highlight=False)
    if not exc.log_tail.rstrip().endswith(_STOPPED):  # the detached supervisor's log says it
        _err.print(_STOPPED, markup=False)
    return typer.Exit(1)


def up(
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            "-d",
            help="Return once every component is ready and leave the stack running under a "
            "supervisor in the background (stop it with `slmops down`).",
        ),
    ] = False,
    nats_cluster: Annotated[
        int | None,
        typer.Option(
            "--nats-cluster",
            min=1,
            max=5,
            help="Run NATS as a JetStream cluster of this many nodes (nats-1...) with routes "
            "on 127.0.0.1, streams and buckets replicated 3 times (SLMOPS_JETSTREAM_REPLICAS); "
            "same as SLMOPS_STACK_NATS_CLUSTER_SIZE.",
        ),
    ] = None,
) -> None:
    """Start the local stack on 127.0.0.1: NATS (JetStream), S3, then every service.

    Waits until each component is ready before starting the next, then supervises: a
    component that exits is started again with backoff (`slmops status` shows its restarts).
    In the foreground (the default) Ctrl-C or SIGTERM stops everything; `--detach` leaves a
    supervisor process in the background.
    """
    if nats_cluster is not None:  # the environment: the detached supervisor reads it too
        os.environ["SLMOPS_STACK_NATS_CLUSTER_SIZE"] = str(nats_cluster)
    stack, platform = _stack(), _platform()
    try:
        platform = stack_platform(stack, platform)
        specs = plan_stack(stack, platform)
        if detach:
            _up_detached(stack, platform, specs)
        code = run_up(
            specs,
            stack,
            platform,
            report=_report,
            on_ready=lambda running: _print_ready(running.state, platform, detach=False),
        )
    except ComponentFailedError as exc:
        raise _component_failed(exc) from exc
    except StackError as exc:
        raise _fail(str(exc)) from exc
    except KeyboardInterrupt as exc:
        _err.print("interrupted: stopped everything that was started", markup=False)
        raise typer.Exit(130) from exc
    raise typer.Exit(code)


def _up_detached(stack: StackSettings, platform: PlatformSettings, specs: list[Any]) -> None:
    """Check what can be checked here (clear errors), spawn the supervisor, wait until the
    stack is ready; exits the command either way."""
    var_dir = platform.var_dir.resolve()
    (var_dir / "logs").mkdir(parents=True, exist_ok=True)
    clear_stale_state(var_dir, _report)
    check_can_start(specs, platform)
    supervisor = DetachedSupervisor(var_dir)
    _report(f"supervisor started (pid {supervisor.popen.pid}, log {supervisor.log_path})")
    try:
        state = supervisor.wait_ready()
    except KeyboardInterrupt as exc:
        supervisor.terminate(stack.stop_timeout_s * 3 + 10)
        _err.print("interrupted: stopped everything that was started", markup=False)
        raise typer.Exit(130) from exc
    _print_ready(state, platform, detach=True)
    raise typer.Exit(0)


def supervise() -> None:
    """The detached supervisor `slmops up --detach` spawns (not for interactive use)."""
    stack, platform = _stack(), _platform()

    def report(message: str) -> None:
        print(f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {message}", flush=True)

    log = supervisor_log_path(platform.var_dir.resolve())
    try:
        platform = stack_platform(stack, platform)
        specs = plan_stack(stack, platform)
        code = run_up(
            specs,
            stack,
            platform,
            report=report,
            supervisor_log=log,
            on_ready=lambda _: report("every component is ready; supervising"),
        )
    except ComponentFailedError as exc:
        report(f"error: {exc}\n--- last lines of {exc.log_path} ---\n{exc.log_tail}\n{_STOPPED}")
        raise typer.Exit(1) from exc
    except StackError as exc:
        report(f"error: {exc}")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt as exc:
        report("interrupted: stopped everything that was started")
        raise typer.Exit(130) from exc
    report(f"supervisor exits ({code})")
    raise typer.Exit(code)


def down() -> None:
    """Stop everything `slmops up` started: services, then S3, then NATS.

    SIGTERM, then SIGKILL after SLMOPS_STACK_STOP_TIMEOUT_S; a second Ctrl-C kills at once.
    A PID that now belongs to another process is never signalled.
    """
    stack, platform = _stack(), _platform()
    signals = Signals()
    signals.stopping = True  # from the first Ctrl-C on: skip the grace period
    with signals.installed():
        try:
            stopped = stop_stack(platform.var_dir, stack.stop_timeout_s, _report, signals.force)
        except StackError as exc:
            raise _fail(str(exc)) from exc
    _out.print("stopped the local stack" if stopped else "nothing running", markup=False)


def status(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Show each local stack component: PID, alive, ready, restarts and last exit, URL; and
    the supervisor that restarts them. Exit 1 unless all are ready."""
    platform = _platform()
    try:
        components = stack_status(platform.var_dir)
        supervisor = supervisor_status(platform.var_dir)
    except StackError as exc:
        raise _fail(str(exc)) from exc
    storage = storage_use(components) if components else []
    document = status_json(components, storage, supervisor)
    if json_output:
        print(json.dumps(document, indent=2))
    elif components is None:
        _out.print("nothing running", markup=False)
    else:
        table = Table(title="slmops local stack", title_justify="left")
        columns = ("component", "pid", "alive", "ready", "restarts", "last exit", "url", "detail")
        for column in columns:
            table.add_column(column, justify="right" if column in ("pid", "restarts") else "left")
        for item in components:
            table.add_row(
                item.name,
                str(item.pid),
                "yes" if item.alive else "[red]no[/]",
                "yes" if item.ready else "[red]no[/]",
                str(item.restarts),
                _last_exit(item).replace("[", "\\["),
                item.url,
                item.detail.replace("[", "\\["),
            )
        _out.print(table)
        if supervisor is not None:
            how = "detached" if supervisor.detached else "foreground `slmops up`"
            state = "running" if supervisor.alive else "NOT running: nothing restarts what exits"
            log = f", log {supervisor.log_path}" if supervisor.log_path else ""
            _out.print(f"supervisor: pid {supervisor.pid} ({how}) {state}{log}", markup=False)
        _print_storage(storage)
    raise typer.Exit(0 if document["ready"] else 1)


def _last_exit(item: ComponentStatus) -> str:
    if item.last_exit is None:
        return "-"
    if item.last_exit_at is None:
        return item.last_exit
    at = datetime.fromtimestamp(item.last_exit_at, UTC).strftime("%H:%M:%S")
    return f"{item.last_exit} at {at} UTC"


def _print_storage(storage: list[StorageUse]) -> None:
    if not storage:
        return
    table = Table(title="storage (JetStream)", title_justify="left")
    for column in ("stream", "messages", "size MiB", "cap MiB", "used", "replicas"):
        table.add_column(column, justify="left" if column == "stream" else "right")
    for use in storage:
        cap = f"{use.max_bytes / 2**20:,.0f}" if use.max_bytes > 0 else "none"
        used = f"{use.share:.1%}" if use.share is not None else "-"
        table.add_row(use.name, f"{use.messages:,}", f"{use.bytes / 2**20:,.1f}", cap, used,
                      str(use.replicas))  # fmt: skip
    _out.print(table)
    for use in storage:
        if (warning := use.warning()) is not None:
            _out.print(f"warning: {warning}", style="yellow", markup=False)
