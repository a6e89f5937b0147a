"""Keeping the local stack up: a component that exits is started again, with backoff.

:func:`run_up` is `slmops up` in the foreground and the body of the detached supervisor that
`slmops up --detach` spawns (:mod:`slmops.stack.detached`): start everything, then
:func:`supervise`. A component (NATS, S3 or a service) that exits is started again with the
same argv and env after a backoff (``restart_backoff_initial_s``, doubling up to
``restart_backoff_max_s``, back to the start once it stayed ready for ``restart_reset_after_s``);
its restarts and last exit reason go to the state file for `slmops status`. Only Ctrl-C/SIGTERM
of the supervisor or `slmops down` stops the stack.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from slmops.settings import PlatformSettings
from slmops.stack.components import ComponentSpec, StackError, StackSettings, probe
from slmops.stack.launcher import RunningStack, prepare, start_stack
from slmops.stack.signals import Signals
from slmops.stack.state import Report, read_state, write_state


def exit_reason(returncode: int) -> str:
    """``exit code 3`` or, for a process ended by a signal, its name (``SIGKILL``)."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def reap_leftovers(pid: int, started: float, report: Report) -> None:
    """Kill what a dead component left in its process group (e.g. an in-process Ray's
    helpers), so its restart does not run beside them. Only processes of that group created
    during the component's life: a reused PID is never touched."""
    now = time.time()
    for proc in psutil.process_iter(["pid", "create_time"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            created = float(proc.info["create_time"])
            if started - 0.05 <= created <= now and os.getpgid(proc.pid) == pid:
                report(f"killing pid {proc.pid}, left behind by the exited pid {pid}")
                proc.kill()


@dataclass
class _Watch:
    """The supervisor's view of one component (monotonic clock)."""

    spec: ComponentSpec
    backoff_s: float
    restart_due: float | None = None  # waiting out its backoff until then
    ready_since: float | None = None  # the current process has been ready since then
    awaiting_ready: bool = False  # restarted, not ready yet


class Supervisor:
    """Restarts the components of ``running`` as they exit; :meth:`run` until stopped."""

    def __init__(
        self,
        running: RunningStack,
        specs: Iterable[ComponentSpec],
        poll_interval_s: float = 0.25,
        stop: threading.Event | None = None,
    ) -> None:
        self.running = running
        self.settings = running.stack
        self.poll_interval_s = poll_interval_s
        self.stop = stop or threading.Event()
        now = time.monotonic()
        self.watches = {
            spec.name: _Watch(spec, self.settings.restart_backoff_initial_s, ready_since=now)
            for spec in specs
            if spec.name in running.popens
        }

    def run(self) -> int:
        """Supervise until Ctrl-C/SIGTERM (or :attr:`stop`): then stop the stack, exit 0.
        Returns at once, stopping nothing, if the state file says someone else stops it."""
        report = self.running.report
        try:
            while not self.stop.wait(self.poll_interval_s):
                try:
                    state = read_state(self.running.state_file)
                except StackError as exc:  # someone wrote it by hand: ours is still good
                    report(str(exc))
                    write_state(self.running.state_file, self.running.state)
                    continue
                if state is None or state.stopping:
                    report("the stack is being stopped by `slmops down`")
                    return 0
                self.check()
        except KeyboardInterrupt:
            pass
        report("stopping the stack")
        self.running.stop()
        return 0

    def check(self) -> None:
        """One round: note exits, restart those due, watch restarted ones become ready."""
        changed = False
        for name, watch in self.watches.items():
            now = time.monotonic()
            code = self.running.popens[name].poll()
            if watch.restart_due is None and code is not None:
                self._exited(watch, code)
                changed = True
            elif watch.restart_due is not None and now >= watch.restart_due:
                self._restart(watch)
                changed = True
            elif code is None and watch.awaiting_ready:
                self._probe(watch)
            elif watch.ready_since is not None and (
                now - watch.ready_since >= self.settings.restart_reset_after_s
            ):
                watch.backoff_s = self.settings.restart_backoff_initial_s
        if changed:
            write_state(self.running.state_file, self.running.state)

    def _exited(self, watch: _Watch, code: int) -> None:
        record = self.running.record(watch.spec.name)
        reason = exit_reason(code)
        record.last_exit, record.last_exit_at = reason, time.time()
        record.backoff_s = watch.backoff_s
        record.restart_at = time.time() + watch.backoff_s
        watch.restart_due = time.monotonic() + watch.backoff_s
        watch.ready_since, watch.awaiting_ready = None, False
        self.running.report(
            f"{record.name} (pid {record.pid}) exited: {reason}; "
            f"restarting it in {watch.backoff_s:g} s"
        )
        reap_leftovers(record.pid, record.create_time, self.running.report)

    def _restart(self, watch: _Watch) -> None:
        name = watch.spec.name
        watch.restart_due = None
        next_backoff_s = min(watch.backoff_s * 2, self.settings.restart_backoff_max_s)
        try:
            self.running.restart(watch.spec)
        except StackError as exc:  # e.g. its binary went away: try again after the next backoff
            record = self.running.record(name)
            record.last_exit, record.last_exit_at = f"cannot start: {exc}", time.time()
            watch.backoff_s = next_backoff_s
            record.backoff_s = watch.backoff_s
            record.restart_at = time.time() + watch.backoff_s
            watch.restart_due = time.monotonic() + watch.backoff_s
            self.running.report(f"{exc}; trying again in {watch.backoff_s:g} s")
            return
        watch.backoff_s = next_backoff_s
        watch.awaiting_ready = True
        record = self.running.record(name)
        self.running.report(f"restarted {name} (pid {record.pid}, restart {record.restarts})")

    def _probe(self, watch: _Watch) -> None:
        spec = watch.spec
        if not probe(spec.kind, spec.ready_url, timeout_s=1.0).ready:
            return
        try:
            prepare(spec, self.running.platform)
        except StackError as exc:  # the next round probes and prepares again
            self.running.report(f"{spec.name} answers but is not usable yet: {exc}")
            return
        watch.awaiting_ready, watch.ready_since = False, time.monotonic()
        self.running.report(f"{spec.name} is ready again")


def supervise(
    running: RunningStack, specs: Iterable[ComponentSpec], poll_interval_s: float = 0.25
) -> int:
    """Stay up until Ctrl-C/SIGTERM (stop the stack, exit 0) or `slmops down` from elsewhere
    (exit 0), restarting components that exit meanwhile."""
    return Supervisor(running, specs, poll_interval_s).run()


def run_up(
    specs: list[ComponentSpec],
    stack: StackSettings,
    platform: PlatformSettings,
    *,
    report: Report,
    on_ready: Callable[[RunningStack], None],
    supervisor_log: Path | None = None,
) -> int:
    """`slmops up` (or the detached supervisor that `up --detach` spawns, which passes its
    ``supervisor_log``): start, call ``on_ready``, then supervise until Ctrl-C/SIGTERM or
    `slmops down`. Returns the exit code; raises :class:`StackError` (nothing left running)
    or KeyboardInterrupt during startup."""
    signals = Signals()
    with signals.installed():
        running = start_stack(specs, stack, platform, report, signals)
        try:
            running.state.detached = supervisor_log is not None
            running.state.supervisor_log = str(supervisor_log) if supervisor_log else None
            running.mark_ready()
            on_ready(running)
        except BaseException:
            running.stop()
            raise
        return supervise(running, specs)
