"""The hang reporter: a test that times out shows what its coroutines were awaiting."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from slmops.testing.hangs import pending_tasks_report

HUNG_TEST = """
import asyncio
import pytest

async def wait_for_a_reply_that_never_comes(event):
    await event.wait()

@pytest.mark.timeout(3)
async def test_hangs():
    await wait_for_a_reply_that_never_comes(asyncio.Event())
"""


async def test_the_report_names_the_coroutine_a_pending_task_waits_in() -> None:
    async def waiting_for_the_broker(never: asyncio.Event) -> None:
        await never.wait()

    task = asyncio.create_task(waiting_for_the_broker(asyncio.Event()), name="the-waiter")
    await asyncio.sleep(0)
    report = await asyncio.to_thread(pending_tasks_report)  # read from another thread
    task.cancel()

    (line,) = [line for line in report.splitlines() if "the-waiter" in line]
    assert "test_testing_hangs.py" in line
    assert "waiting_for_the_broker" in line


def test_a_test_that_times_out_reports_where_it_waited(tmp_path: Path) -> None:
    (tmp_path / "test_hung.py").write_text(HUNG_TEST)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
         "asyncio_mode=auto", "test_hung.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert run.returncode == 1, run.stdout + run.stderr
    assert "Timeout (>3.0s)" in run.stdout
    chain = r"Task-1: test_hung.py:\d+ test_hangs > test_hung.py:\d+ wait_for_a_reply_that_ne"
    # in the failure's report, and again in the session's summary
    assert re.search(r"-- asyncio tasks before the timeout --+\n.*\n  " + chain, run.stdout)
    summary = r"-- asyncio tasks of test_hung.py::test_hangs before its timeout --+\n.*\n  "
    assert re.search(summary + chain, run.stdout), run.stdout
