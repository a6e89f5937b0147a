"""A replica that goes silent mid-job (its process died, its stream broke without an error)
is taken for lost after ``replica_silence_s``: the job is retried, never awaited for good.
A job waiting for a replica (queued in Ray Serve, a replica starting) and a slow replica that
keeps sending heartbeats are not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import OptimizationFailed, TransientError
from slmops.profiles import load_profiles
from slmops.settings import PlatformSettings
from slmops.testing.factories import model_published
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.dispatch import run_job
from slmops_optimizer.plans import job_spec
from slmops_optimizer.settings import OptimizerSettings

pytestmark = [pytest.mark.integration]

PROFILES = Path(__file__).resolve().parents[3] / "deploy" / "profiles"


@dataclass
class Replica:
    """Ray Serve's handle as the dispatcher sees it: its replica sends ``updates``, each
    after its pause in seconds, then nothing at all (no heartbeat, no end)."""

    updates: list[tuple[float, dict[str, Any]]]
    closed: list[bool] = field(default_factory=list)

    async def wait_ready(self, timeout_s: float) -> bool:
        return True

    def stream(self, spec: dict[str, Any]) -> Any:
        return _Stream(self)


class _Stream:
    def __init__(self, compute: Replica) -> None:
        self.compute = compute
        self.updates = self._updates()

    async def _updates(self) -> AsyncIterator[dict[str, Any]]:
        for pause_s, update in self.compute.updates:
            await asyncio.sleep(pause_s)
            yield update
        await asyncio.Event().wait()  # the replica is gone: nothing more comes

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self.updates.__anext__()

    def cancel(self) -> None:
        self.compute.closed.append(True)


class NothingStored:
    async def variant(self, variant_id: str) -> None:
        return None


@dataclass
class Runtime:
    bus: Bus

    async def key_value(self, bucket: str) -> Any:
        return await self.bus.key_value(bucket)


def _spec(ctx: OptimizerContext) -> Any:
    profile = next(iter(ctx.profiles.values()))
    return job_spec(model_published().data, profile, profile.recipes[0].recipe(), ctx.settings)


async def _jobs(ctx: OptimizerContext) -> tuple[Any]:
    jobs = await ctx.jobs()
    assert jobs is not None
    return (jobs,)


def _context(bus: Bus, tmp_path: Path, compute: Replica) -> OptimizerContext:
    settings = OptimizerSettings(platform=PlatformSettings(), work_dir=tmp_path,
                                 replica_silence_s=5)  # fmt: skip
    return OptimizerContext(settings=settings, profiles=load_profiles(PROFILES),
                            compute=compute, registry=NothingStored(),  # type: ignore[arg-type]
                            runtime=Runtime(bus))  # type: ignore[arg-type]  # fmt: skip


async def test_a_replica_silent_past_the_bound_fails_its_job_transiently(
    bus: Bus, tmp_path: Path
) -> None:
    # setup: a job whose replica reports one step, then falls silent
    compute = Replica([(0.0, {"kind": "progress", "progress": 0.1, "step": "export"})])
    ctx = _context(bus, tmp_path, compute)
    spec = _spec(ctx)

    # execute
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TransientError) as raised:
        await run_job(spec, ctx, *await _jobs(ctx))
    waited_s = loop.time() - began

    # assert: a retry (transient), after the bound, with the reason; the stream closed
    assert "the replica sent nothing for 5 s" in str(raised.value)
    assert waited_s >= 5
    assert compute.closed == [True]
    (jobs,) = await _jobs(ctx)
    record = await jobs.get(spec.job_id)
    assert record.state == "queued"
    assert "taken for lost" in (record.step or "")


async def test_a_queued_job_then_a_slow_replica_sending_heartbeats_is_followed_to_its_end(
    bus: Bus, tmp_path: Path
) -> None:
    # setup: the job waits for a replica longer than the bound (no word while queued), then
    # runs with heartbeats 2 s apart for longer than the bound, then its own outcome
    beats = [(2.0, {"kind": "heartbeat"})] * 3
    final = {"kind": "failed", "transient": False, "reason": "the recipe does not apply"}
    compute = Replica([(6.0, {"kind": "progress", "progress": 0.0, "step": "start"}), *beats,
                       (0.5, final)])  # fmt: skip
    ctx = _context(bus, tmp_path, compute)
    spec = _spec(ctx)

    # execute
    outcome = await run_job(spec, ctx, *await _jobs(ctx))

    # assert: the replica's outcome, not a silence
    assert isinstance(outcome.data, OptimizationFailed)
    assert outcome.data.reason == "the recipe does not apply"
    (jobs,) = await _jobs(ctx)
    assert (await jobs.get(spec.job_id)).state == "failed"
