"""Waiting for an effect in a test: poll a condition with a deadline, fail saying what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def until(
    condition: Callable[[], bool], what: str, *, timeout_s: float = 30.0, every_s: float = 0.01
) -> None:
    """Return once ``condition()`` holds; raise AssertionError naming ``what`` past the
    deadline (a flaky sleep-then-assert is a failing test)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        await asyncio.sleep(every_s)


async def until_answered(
    condition: Callable[[], Awaitable[bool]], what: str, *, timeout_s: float = 30.0,
    every_s: float = 0.1,
) -> None:  # fmt: skip
    """:func:`until` for a condition that must ask someone (an HTTP call, a KV read)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        await asyncio.sleep(every_s)
