"""`slmops up --detach`: a supervisor process of its own that starts and keeps the stack.

The CLI spawns ``python -m slmops.stack supervise`` in a new session (output to
``<var_dir>/logs/supervisor.log``), which runs the same start + supervise code as a foreground
`slmops up` and owns the components; the CLI only waits until the state file says every
component is ready, or the supervisor exits (startup failed: it stopped what it started).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from slmops.stack.launcher import ComponentFailedError, log_tail
from slmops.stack.state import StackState, read_state, state_path

SUPERVISOR_LOG_NAME = "supervisor.log"
_POLL_S = 0.1


def supervisor_log_path(var_dir: Path) -> Path:
    return var_dir / "logs" / SUPERVISOR_LOG_NAME


class SupervisorFailedError(ComponentFailedError):
    """The detached supervisor exited before the stack was ready (it stopped what it started;
    its log says why)."""


class DetachedSupervisor:
    """The spawned supervisor process, seen from the `slmops up --detach` that spawned it."""

    def __init__(self, var_dir: Path) -> None:
        self.var_dir = var_dir
        self.log_path = supervisor_log_path(var_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.log_offset = log.tell()
            log.write(f"=== slmops up --detach at {datetime.now(UTC).isoformat()} ===\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "slmops.stack", "supervise"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # Ctrl-C in this terminal later does not reach it
            )

    def wait_ready(self) -> StackState:
        """Until the state file, written by this supervisor, says every component is ready;
        :class:`SupervisorFailedError` with its log's tail if it exits first."""
        path = state_path(self.var_dir)
        while True:
            code = self.popen.poll()
            if code is not None:
                raise SupervisorFailedError(
                    f"the stack did not start (the supervisor exited with code {code})",
                    self.log_path,
                    log_tail(self.log_path, self.log_offset),
                )
            with contextlib.suppress(Exception):  # half-written by another version: retry
                state = read_state(path)
                if state is not None and state.supervisor_pid == self.popen.pid and state.ready:
                    return state
            time.sleep(_POLL_S)

    def terminate(self, timeout_s: float) -> None:
        """Ctrl-C while waiting: SIGTERM the supervisor (it stops what it started) and wait
        for it; SIGKILL after ``timeout_s``."""
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
