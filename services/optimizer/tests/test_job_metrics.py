"""The optimizer's job families: jobs by state, and ended jobs' wall time as a histogram."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from slmops.service.metrics import ServiceMetrics
from slmops_optimizer.jobspec import JobRecord
from slmops_optimizer.metrics import register

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _job(job_id: str, state: str, took_s: float) -> JobRecord:
    return JobRecord(job_id=job_id, model_name="m", version="1", device_class="cpu",
                     recipe_name="int8", state=state, created_at=T0,  # type: ignore[arg-type]
                     updated_at=T0 + timedelta(seconds=took_s))  # fmt: skip


@dataclass
class FakeStore:
    records: list[JobRecord]

    async def list(self) -> list[JobRecord]:
        return self.records


@dataclass
class FakeContext:
    store: FakeStore | None

    async def jobs(self) -> FakeStore | None:
        return self.store


async def test_jobs_by_state_and_how_long_the_ended_ones_took() -> None:
    store = FakeStore([_job("a", "succeeded", 20), _job("b", "succeeded", 400),
                       _job("c", "failed", 3), _job("d", "running", 50),
                       _job("e", "reused", 0)])  # fmt: skip
    metrics = ServiceMetrics("optimizer")
    context: Any = FakeContext(store)
    register(metrics, context)
    text = (await metrics.render()).decode()
    value = metrics.registry.get_sample_value

    assert value("slmops_optimizer_jobs", {"state": "succeeded"}) == 2
    assert value("slmops_optimizer_jobs", {"state": "running"}) == 1
    assert value("slmops_optimizer_jobs", {"state": "cancelled"}) == 0
    succeeded = "slmops_optimizer_job_duration_seconds"
    assert value(f"{succeeded}_bucket", {"state": "succeeded", "le": "30"}) == 1
    assert value(f"{succeeded}_bucket", {"state": "succeeded", "le": "600"}) == 2
    assert value(f"{succeeded}_bucket", {"state": "succeeded", "le": "+Inf"}) == 2
    assert value(f"{succeeded}_sum", {"state": "succeeded"}) == 420
    assert value(f"{succeeded}_count", {"state": "failed"}) == 1
    assert 'state="reused"' not in text.split(succeeded, 1)[1]  # nothing ran to be timed
    assert "job_id" not in text


async def test_before_the_store_is_reachable_every_state_reads_zero() -> None:
    metrics = ServiceMetrics("optimizer")
    context: Any = FakeContext(None)
    register(metrics, context)
    await metrics.render()

    assert metrics.registry.get_sample_value("slmops_optimizer_jobs", {"state": "queued"}) == 0
