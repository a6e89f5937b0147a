"""Work shared by the agents of one process (a simulated fleet, as one site's gateways would
share it): the first to ask computes, everyone asking meanwhile waits for that same answer,
and later askers get it at once. A failure is not remembered: the next asker tries again.

Without it, a thousand agents acting on one cohort's state at once all miss a plain cache
and each verify the same signatures."""

from __future__ import annotations

import asyncio
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
