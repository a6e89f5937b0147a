"""Processes whose liveness a test needs: one that runs until the test ends, one that is gone."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import psutil


@contextlib.contextmanager
def live_process() -> Iterator[psutil.Process]:
    """A Python process sleeping until the block ends (then killed and reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield psutil.Process(child.pid)
    finally:
        child.kill()
        child.wait()


def dead_process() -> psutil.Process:
    """A process that ran and exited; its start time is kept (names made from it need it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    proc.create_time()  # psutil caches it: asked again after the exit, it answers
    child.wait()
    return proc
