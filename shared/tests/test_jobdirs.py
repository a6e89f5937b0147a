"""Job temp folders name their owner process; a start removes those whose owner died."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from slmops.jobdirs import owned_dir, owned_name, remove_orphaned
from slmops.testing.processes import dead_process, live_process


@pytest.fixture
def running() -> Iterator[psutil.Process]:
    with live_process() as proc:
        yield proc


def _folder(root: Path, proc: psutil.Process, prefix: str = "job-1") -> Path:
    folder = root / owned_name(prefix, proc)
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "model.onnx").write_bytes(b"half written")
    return folder


def test_folders_of_dead_owners_go_and_live_ones_stay(
    tmp_path: Path, running: psutil.Process
) -> None:
    dead = _folder(tmp_path, dead_process())
    live = _folder(tmp_path, running)
    mine = _folder(tmp_path, psutil.Process(), "probe")
    other = tmp_path / "not-a-job-folder"
    other.mkdir()

    assert remove_orphaned(tmp_path) == [dead]

    assert not dead.exists()
    assert {p.name for p in tmp_path.iterdir()} == {live.name, mine.name, other.name}


def test_a_reused_pid_does_not_keep_a_folder(tmp_path: Path) -> None:
    me = psutil.Process()

    class Earlier:  # this PID, but created long before this process: another process
        pid = me.pid

        def create_time(self) -> float:
            return float(me.create_time()) - 1000

    folder = tmp_path / owned_name("job", Earlier())  # type: ignore[arg-type]
    folder.mkdir()
    assert remove_orphaned(tmp_path) == [folder]


def test_a_job_folder_is_removed_when_the_job_ends_and_a_missing_root_is_fine(
    tmp_path: Path,
) -> None:
    used: list[Path] = []

    def job() -> None:
        with owned_dir(tmp_path / "jobs", "job/../1") as folder:
            used.append(folder)
            (folder / "x").write_text("x")
            raise RuntimeError("the job failed")

    with pytest.raises(RuntimeError):
        job()
    assert used[0].parent == tmp_path / "jobs"  # the prefix cannot climb out of the root
    assert list((tmp_path / "jobs").iterdir()) == []
    assert remove_orphaned(tmp_path / "absent") == []
