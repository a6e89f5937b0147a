"""Work shared by the agents of one process (a simulated fleet, as one site's gateways would
share it): the first to ask computes, everyone asking meanwhile waits for that same answer,
and later askers get it at once. A failure is not remembered: the next asker tries again.

Without it, a thousand agents acting on one cohort's state at once all miss a plain cache
and each verify the same signatures."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Shared(Generic[K, V]):
    def __init__(self) -> None:
        self._answers: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        answer = self._answers.get(key)
        if answer is not None and answer.done() and answer.exception() is None:
            return answer.result()  # the common case: answered already, nothing to wait for
        if answer is None:
            answer = self._answers[key] = asyncio.ensure_future(compute())
        try:
            return await asyncio.shield(answer)  # one asker cancelled: not the others' answer
        except Exception:
            if self._answers.get(key) is answer:
                del self._answers[key]
            raise

    def __len__(self) -> int:
        return len(self._answers)


class Limiter:
    """At most ``limit`` holders at once, the others served first come, first served.

    Not ``asyncio.Semaphore``: on Python 3.11 each release scans the queue of waiters from its
    start (and each woken waiter removes itself from it), so thousands of waiting agents made
    acting on a wave quadratic. Here a release hands its slot to the next waiter directly."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._free = limit
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release()  # handed a slot just as it was cancelled: pass it on
            else:
                self._waiting.remove(slot)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot goes straight to the next waiter
                return
        self._free += 1
