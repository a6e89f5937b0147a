"""Job temp folders that name their owner process, so a killed job's folder can be removed.

A job (an optimization, a validation probe) works in a folder of its own under a per-service
root and removes it when it ends, whatever happens. A process killed mid-job cannot, so the
folder is named ``<prefix>.pid<pid>.<create time ms>.<random>``: at the next start the service
calls :func:`remove_orphaned`, which removes the folders whose owner process is gone (a PID
reused by another process does not count: its create time differs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(?P<prefix>.*)\.pid(?P<pid>\d+)\.(?P<created_ms>\d+)\.[0-9a-f]+$")
#: Two create times closer than this are the same process (psutil reports floats).
_CREATE_TIME_TOLERANCE_S = 0.05


def _safe(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", prefix)[:80] or "job"


def owned_name(prefix: str, proc: psutil.Process | None = None) -> str:
    """A folder name for a job of ``proc`` (this process by default)."""
    proc = proc or psutil.Process()
    created_ms = round(float(proc.create_time()) * 1000)
    return f"{_safe(prefix)}.pid{proc.pid}.{created_ms}.{os.urandom(4).hex()}"


def owner_alive(folder: Path) -> bool | None:
    """Whether the process that owns ``folder`` still runs; None if the name names none."""
    match = _NAME.match(folder.name)
    if match is None:
        return None
    try:
        proc = psutil.Process(int(match["pid"]))
        created_s = float(proc.create_time())
        running = proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # someone else's live process: never touch its folder
    return running and abs(created_s - int(match["created_ms"]) / 1000) <= _CREATE_TIME_TOLERANCE_S


@contextlib.contextmanager
def owned_dir(root: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder under ``root`` named after this process, removed on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / owned_name(prefix)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned(root: Path) -> list[Path]:
    """Remove the folders under ``root`` whose owner process is gone (left by a job that was
    killed); folders of live processes and folders not named by :func:`owned_dir` stay.
    Returns what was removed."""
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except FileNotFoundError:
        return removed
    for folder in children:
        if folder.is_dir() and owner_alive(folder) is False:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d job folders of processes that died under %s", len(removed), root)
    return removed
