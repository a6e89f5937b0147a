"""A replica starting removes the job folders of replicas that were killed mid-job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from slmops.jobdirs import owned_name
from slmops.testing.processes import dead_process, live_process
from slmops_optimizer.workspace import Workspace


@pytest.fixture
def running() -> Iterator[psutil.Process]:
    with live_process() as proc:
        yield proc


def _folder(root: Path, proc: psutil.Process) -> Path:
    folder = root / owned_name("job-1", proc)
    folder.mkdir(parents=True)
    (folder / "variant.onnx").write_bytes(b"half written")
    return folder


def test_a_starting_workspace_removes_folders_of_dead_jobs_only(
    tmp_path: Path, running: psutil.Process
) -> None:
    dead = dead_process()
    jobs = tmp_path / "jobs"
    gone, kept = _folder(jobs, dead), _folder(jobs, running)
    store: Any = None
    workspace = Workspace(tmp_path, store)  # a replica starting
    assert not gone.exists()
    assert kept.exists()
    with workspace.job_dir("job-2") as folder:
        assert folder.parent == jobs
        assert folder.name.startswith("job-2.pid")
    assert not folder.exists()
