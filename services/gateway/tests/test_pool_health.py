"""Bounded generation turns, the health window's generation figures, shadow agreement's rule."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import pytest

from slmops.generation import Sampling
from slmops_gateway.errors import Saturated
from slmops_gateway.health import HealthWindow
from slmops_gateway.pool import GenerationPool, Limiter
from slmops_gateway.serving import Job, Outcome
from slmops_gateway.shadow import END, _served_greedy, leading_agreement


async def test_the_limiter_hands_out_turns_in_order_and_times_out() -> None:
    limiter = Limiter(2)
    await limiter.acquire(0)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    with pytest.raises(Saturated, match=r"all 2 generation slots stayed busy for 0\.05 s"):
        await limiter.acquire(0.05)
    assert limiter.waiting == 0
    order: list[str] = []

    async def wait(name: str) -> None:
        await limiter.acquire(5)
        order.append(name)

    first = asyncio.create_task(wait("first"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0.01)
    assert limiter.waiting == 2
    assert not limiter.try_acquire()  # a free turn goes to the waiters first
    limiter.release()
    await first
    limiter.release()
    await second
    assert order == ["first", "second"]
    assert (limiter.running, limiter.waiting) == (2, 0)


async def test_a_waiter_that_goes_away_takes_no_turn() -> None:
    limiter = Limiter(1)
    await limiter.acquire(0)
    gone = asyncio.create_task(limiter.acquire(5))
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    limiter.release()
    assert (limiter.running, limiter.waiting) == (0, 0)


async def test_the_pool_holds_a_turn_until_the_thread_ends_and_stop_cancels() -> None:
    pool = GenerationPool(1, queue_timeout_s=0.05)
    started, release = threading.Event(), threading.Event()

    def work(cancel: threading.Event) -> str:
        started.set()
        while not (release.is_set() or cancel.is_set()):
            release.wait(0.01)
        return "cancelled" if cancel.is_set() else "done"

    future, _ = await pool.submit(work)
    await asyncio.to_thread(started.wait, 5)
    assert pool.try_submit(work) is None  # shadow work never waits
    with pytest.raises(Saturated):
        await pool.submit(work)
    assert "1 of 1 generating" in (await pool.check()).detail
    release.set()
    assert await future == "done"
    await asyncio.sleep(0)  # the turn comes back on the loop
    assert pool.limiter.running == 0
    release.clear()
    started.clear()
    future, _ = await pool.submit(work)
    await asyncio.to_thread(started.wait, 5)
    await pool.stop()
    assert await future == "cancelled"


def test_the_health_window_reports_time_to_first_token_and_decode_speed() -> None:
    window = HealthWindow()
    for ttft, tokens, seconds in [(100.0, 9, 0.5), (300.0, 39, 1.5), (None, 0, 0.0)]:
        window.record(1000.0, ok=True)
        window.record_generation(ttft, tokens, seconds)
    window.record(5.0, ok=True)  # an embedding request: no generation figures
    health = window.take()
    assert health.request_count == 4
    assert health.ttft_p50_ms == pytest.approx(200.0)
    assert health.ttft_p95_ms == pytest.approx(290.0)
    assert health.decode_tokens_per_s == pytest.approx(48 / 2.0)  # summed, not averaged
    assert health.latency_p50_ms == pytest.approx(1000.0)  # still the whole request
    empty = window.take()
    assert (empty.ttft_p50_ms, empty.ttft_p95_ms, empty.decode_tokens_per_s) == (None, None, None)


def test_shadow_agreement_counts_identical_leading_tokens() -> None:
    assert leading_agreement([1, 2, 3, 4], [1, 2, 3, 4], 4) == 1.0
    assert leading_agreement([1, 2, 9, 4], [1, 2, 3, 4], 4) == 0.5  # nothing after a divergence
    assert leading_agreement([7, 2, 3, 4], [1, 2, 3, 4], 4) == 0.0
    assert leading_agreement([1, END, END, END], [1, END, END, END], 4) == 1.0  # both ended


def test_the_served_answer_is_reused_only_when_it_is_the_greedy_prefix() -> None:
    def job(temperature: float) -> Job:
        return Job(cast(Any, None), cast(Any, None), [1], "p", False,
                   Sampling(max_new_tokens=8, temperature=temperature), (), 0.0)  # fmt: skip

    long = Outcome("length", 1, [5, 6, 7, 8, 9], False, 0.0, 0.0)
    ended = Outcome("stop", 1, [5, 6], True, 0.0, 0.0)
    cut = Outcome("stop", 1, [5, 6], False, 0.0, 0.0)  # a stop string cut it
    assert _served_greedy(job(0), long, 4) == [5, 6, 7, 8]
    assert _served_greedy(job(0), ended, 4) == [5, 6, END, END]
    assert _served_greedy(job(0), cut, 4) is None
    assert _served_greedy(job(0.7), long, 4) is None
