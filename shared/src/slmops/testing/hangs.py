"""Where a hung test's coroutines wait: asyncio tasks' stacks, taken just before its timeout.

pytest-timeout dumps the threads' stacks, and for an asyncio test every thread shows the same
idle ``select``: what the test awaited is only in the tasks. A few seconds before the timeout
this plugin lists every pending task of every running event loop with the chain of awaits it
is suspended in (tasks whose chain holds none of our code are only counted). It is attached to
the test's report and repeated at the end of the session's summary, where a log cut to its
last lines still shows it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

_BEFORE_TIMEOUT_S = 10.0
_SNAPSHOT_KEY = pytest.StashKey[str]()
_TIMER_KEY = pytest.StashKey[threading.Timer]()
_ALL_KEY = pytest.StashKey[list[tuple[str, str]]]()


def pending_tasks_report() -> str:
    """Every running loop's pending tasks, one line each: ``name: frame > frame > ...``."""
    lines: list[str] = []
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if loop.is_closed() or not loop.is_running():
            continue
        try:
            tasks = list(asyncio.all_tasks(loop))  # from another thread: good enough to read
        except RuntimeError:  # the set changed while it was copied
            continue
        ours = [line for task in tasks if (line := _describe(task))]
        lines.append(f"loop {id(loop):#x}: {len(tasks)} tasks, {len(ours)} in our code")
        lines.extend(f"  {line}" for line in sorted(ours))
    return "\n".join(lines) or "no running event loop"


def _describe(task: asyncio.Task[Any]) -> str:
    frames, awaited = _await_chain(task.get_coro())
    if not any(_is_ours(f.f_code.co_filename) for f in frames):
        return ""
    chain = [f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}" for f in frames]
    return f"{task.get_name()}: {' > '.join(chain)}{awaited}"


def _await_chain(coro: Any) -> tuple[list[FrameType], str]:
    """The frames of the coroutines ``coro`` awaits, outermost first (``Task.get_stack`` gives
    only the outermost), and what the innermost one waits on if it is another task."""
    frames: list[FrameType] = []
    current = coro
    for _ in range(200):  # a chain is short; a cycle would be a bug elsewhere
        frame = getattr(current, "cr_frame", None) or getattr(current, "ag_frame", None)
        frame = frame or getattr(current, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        following = (getattr(current, "cr_await", None) or getattr(current, "ag_await", None)
                     or getattr(current, "gi_yieldfrom", None))  # fmt: skip
        if following is None and type(current).__name__ in _ASYNC_GENERATOR_STEPS:
            # ``async for``'s step object hides its generator; it is what the step refers to
            following = next((r for r in gc.get_referents(current) if hasattr(r, "ag_frame")),
                             None)  # fmt: skip
        if following is None:
            break
        if isinstance(following, asyncio.Task):
            return frames, f" (awaiting task {following.get_name()})"
        current = following
    return frames, ""


_ASYNC_GENERATOR_STEPS = {"async_generator_asend", "async_generator_athrow"}


def _is_ours(filename: str) -> bool:
    return "site-packages" not in filename and not filename.startswith(sys.base_prefix)


def _snapshot(item: pytest.Item) -> None:
    item.stash[_SNAPSHOT_KEY] = pending_tasks_report()  # used if the test then fails


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Beside pytest-timeout's own timer (returning None lets it set that one too)."""
    after_s = max(settings.timeout - _BEFORE_TIMEOUT_S, settings.timeout * 0.9)
    timer = threading.Timer(after_s, _snapshot, (item,))
    timer.daemon = True
    timer.start()
    item.stash[_TIMER_KEY] = timer


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    timer = item.stash.get(_TIMER_KEY, None)
    if timer is not None:
        timer.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    snapshot = item.stash.get(_SNAPSHOT_KEY, None)
    report = outcome.get_result()
    if snapshot is not None and report.failed:
        report.sections.append(("asyncio tasks before the timeout", snapshot))
        item.config.stash.setdefault(_ALL_KEY, []).append((item.nodeid, snapshot))
        del item.stash[_SNAPSHOT_KEY]  # once, whichever phase failed


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for nodeid, report in config.stash.get(_ALL_KEY, []):
        terminalreporter.write_sep("-", f"asyncio tasks of {nodeid} before its timeout")
        terminalreporter.write_line(report)
