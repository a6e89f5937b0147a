"""Stopping asyncio tasks for sure.

One cancellation is not always enough on Python 3.11: ``asyncio.wait_for`` returns its result
instead of raising when the cancellation lands in the loop iteration its awaitable completed in
(gh-86296, fixed in 3.12), and nats-py awaits every request's reply through it. A loop around
such a call goes on after the cancel, and whoever awaited the task waits for good (the likely
cause of a CI run hung for 15 minutes, every thread idle).
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any], retry_s: float = 1.0) -> None:
    """Cancel ``tasks`` and return once every one has ended, cancelling those still running
    again every ``retry_s``. Their outcomes stay on them (a failure is not raised here, and is
    marked retrieved)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at collection
