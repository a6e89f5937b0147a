"""Work shared by a process's agents: computed once for concurrent askers, failures retried."""

from __future__ import annotations

import asyncio

import pytest

from slmops_gateway.sharing import Limiter, Shared


async def test_concurrent_askers_share_one_computation() -> None:
    shared: Shared[str, int] = Shared()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)  # every asker arrives while it is under way
        return 42

    answers = await asyncio.gather(*(shared.get("k", compute) for _ in range(1000)))

    assert answers == [42] * 1000
    assert calls == 1
    assert await shared.get("k", compute) == 42  # later askers: the same answer, no new call
    assert calls == 1


async def test_a_failure_reaches_the_waiting_askers_and_is_not_remembered() -> None:
    shared: Shared[str, int] = Shared()
    outcomes = iter([RuntimeError("registry away"), 7])

    async def compute() -> int:
        await asyncio.sleep(0.01)
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    failed = await asyncio.gather(*(shared.get("k", compute) for _ in range(3)),
                                  return_exceptions=True)  # fmt: skip

    assert all(isinstance(f, RuntimeError) for f in failed)
    assert await shared.get("k", compute) == 7  # asked again: computed again
    assert len(shared) == 1


async def test_one_asker_cancelled_leaves_the_answer_to_the_others() -> None:
    shared: Shared[str, int] = Shared()
    release = asyncio.Event()

    async def compute() -> int:
        await release.wait()
        return 3

    impatient = asyncio.create_task(shared.get("k", compute))
    patient = asyncio.create_task(shared.get("k", compute))
    await asyncio.sleep(0)
    impatient.cancel()
    release.set()

    assert await patient == 3
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_the_limiter_holds_at_most_its_limit_and_serves_in_order() -> None:
    limiter = Limiter(3)
    holding, most, order = 0, 0, []

    async def work(i: int) -> None:
        nonlocal holding, most
        async with limiter:
            holding += 1
            most = max(most, holding)
            order.append(i)
            await asyncio.sleep(0.001)
            holding -= 1

    await asyncio.gather(*(work(i) for i in range(200)))

    assert most == 3
    assert order == list(range(200))


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    limiter = Limiter(1)
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter:
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await waiter

    async def enter_and_leave() -> None:
        async with limiter:
            pass

    # the one slot is free again: nobody, cancelled or not, kept it
    await asyncio.wait_for(enter_and_leave(), timeout=5)
