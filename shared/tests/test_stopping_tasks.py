"""Stopping a background task for sure: on Python 3.11 one cancellation can be swallowed.

``asyncio.wait_for`` returns its result instead of raising when the cancellation lands in the
loop iteration its awaitable completed in (gh-86296, fixed in 3.12); nats-py awaits every
request's reply through it. A loop around such a call then goes on, and whoever awaited the
cancelled task waited for good (likely what hung a CI run for 15 minutes).
"""

from __future__ import annotations

import asyncio

from slmops.service import BackgroundTask, Check
from slmops.tasks import cancel_and_wait


class RequestLoop(BackgroundTask):
    """A loop awaiting one reply after another, as a ticker awaits its broker."""

    task_name = "request loop"

    def __init__(self) -> None:
        super().__init__()
        self.reply: asyncio.Future[bytes] | None = None
        self.asked = asyncio.Event()
        self.replies = 0

    async def run(self) -> None:
        while True:
            self.reply = asyncio.get_running_loop().create_future()
            self.asked.set()
            await asyncio.wait_for(self.reply, 60)  # as nats-py awaits a request's reply
            self.replies += 1
            self.asked.clear()

    async def check(self) -> Check:
        return Check(True, "looping")


async def test_a_loop_whose_cancellation_lands_with_a_reply_is_still_stopped() -> None:
    # setup: the loop waits for a reply
    looping = RequestLoop()
    await looping.start()
    await looping.asked.wait()
    assert looping.reply is not None

    # execute: the reply lands in the very iteration the stop cancels the loop
    looping.reply.set_result(b"reply")
    stopping = asyncio.create_task(looping.stop())
    done, _ = await asyncio.wait({stopping}, timeout=30)  # a hang, not a speed, is caught here

    # assert: the first cancellation was swallowed (the reply counted), the loop still ended
    assert stopping in done, "stop() still waits for a loop that swallowed its cancellation"
    assert looping.replies == 1
    assert looping.reply.cancelled()  # the loop ended waiting for its next reply


async def test_cancel_and_wait_ends_tasks_that_swallow_a_cancellation_and_keeps_errors() -> None:
    # setup: one task swallows the first cancellation, one has failed already
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(60)

    async def failing() -> None:
        raise ValueError("broken")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await asyncio.sleep(0)

    # execute
    await asyncio.wait_for(cancel_and_wait(*tasks, retry_s=0.05), 10)

    # assert: both ended; the failure is still there to read
    assert swallowed.is_set()
    assert tasks[0].cancelled()
    assert isinstance(tasks[1].exception(), ValueError)
