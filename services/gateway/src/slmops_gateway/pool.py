"""Bounded model work: at most N runs at once, each in its own thread, the rest wait their turn.

A generation holds a thread for as long as it produces tokens (seconds), so it must not run on
the event loop nor in asyncio's shared default executor, where it would starve the agent's own
work (downloads, loads). The pool has exactly ``limit`` threads and a :class:`Limiter` hands out
``limit`` turns: a request waits for a turn at most ``queue_timeout_s`` (then
:class:`~slmops_gateway.errors.Saturated`), and a turn is given back when the *thread* finishes,
not when the client goes away, so the bound holds even while a cancelled run winds down. Shadow
runs ask only for a free turn and never wait (:meth:`GenerationPool.try_submit`).

onnxruntime-genai holds the GIL while it computes a token, so two generations take turns token
by token rather than run in parallel; the bound keeps that interleaving (and the KV caches in
memory) in check. The pool is a runtime dependency: ``/readyz`` shows its load, and stopping
the service cancels every run at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from slmops.service import Check
from slmops_gateway.errors import Saturated

T = TypeVar("T")
Work = Callable[[threading.Event], T]  # gets the run's cancel event


class Limiter:
    """``limit`` turns handed out first come, first served (event-loop only: no locks)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def try_acquire(self) -> bool:
        """A turn if one is free now and nobody waits for it."""
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return True
        return False

    async def acquire(self, timeout_s: float) -> None:
        """A turn within ``timeout_s``, else :class:`Saturated`."""
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            if waiter.done():  # handed over in the same instant: keep it
                return
            self._forget(waiter)
            raise Saturated(
                f"all {self.limit} generation slots stayed busy for {timeout_s:g} s: retry later",
            ) from None
        except asyncio.CancelledError:  # the caller went away while waiting
            if waiter.done():
                self.release()  # it was handed a turn it will not use
            else:
                self._forget(waiter)
            raise

    def release(self) -> None:
        """Give a turn back: to the longest waiter, else to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)


class GenerationPool:
    """``limit`` worker threads behind a :class:`Limiter`; a runtime dependency."""

    def __init__(self, limit: int, queue_timeout_s: float) -> None:
        self.limiter = Limiter(limit)
        self.queue_timeout_s = queue_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="slmops-gen")
        self._cancels: set[threading.Event] = set()

    async def submit(self, work: Work[T]) -> tuple[asyncio.Future[T], threading.Event]:
        """Run ``work(cancel)`` in a worker thread once a turn is free (:class:`Saturated` after
        the queue timeout); returns its future and the event that cancels it."""
        await self.limiter.acquire(self.queue_timeout_s)
        return self._start(work)

    def try_submit(self, work: Work[T]) -> tuple[asyncio.Future[T], threading.Event] | None:
        """Like :meth:`submit` if a turn is free right now; None otherwise (never waits)."""
        return self._start(work) if self.limiter.try_acquire() else None

    def _start(self, work: Work[T]) -> tuple[asyncio.Future[T], threading.Event]:
        cancel = threading.Event()
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, work, cancel)
        except RuntimeError:  # the pool is stopped (the service shuts down)
            self.limiter.release()
            raise
        self._cancels.add(cancel)

        def finished(_: asyncio.Future[T]) -> None:
            self._cancels.discard(cancel)
            self.limiter.release()

        future.add_done_callback(finished)
        return future, cancel

    async def start(self) -> None:
        """Nothing to start: threads are made on demand."""

    async def stop(self) -> None:
        """Cancel every run (each ends at its next token) and let the threads go."""
        for cancel in list(self._cancels):
            cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def check(self) -> Check:
        limiter = self.limiter
        return Check(True, f"{limiter.running} of {limiter.limit} generating, "
                           f"{limiter.waiting} waiting")  # fmt: skip
