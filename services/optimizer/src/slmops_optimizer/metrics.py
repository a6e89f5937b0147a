"""The optimizer's metric families, read from its job store at scrape time.

The job store (KV) is the truth every optimizer instance shares, so the families describe the
store, not this process: jobs by state, and how long the ended ones took from being queued to
their end (a dashboard takes ``max`` over instances, not the sum). Reading the store costs a
KV get per job: it runs at most every ``REFRESH_EVERY_S``, bounded by the scrape's timeout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import get_args

from prometheus_client import Counter as CounterMetric
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from slmops.service.metrics import ServiceMetrics
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.jobspec import JobRecord, JobState

REFRESH_EVERY_S = 10.0
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
TIMED_STATES = ("succeeded", "failed", "cancelled")  # a reused job did no work to time


class JobMetrics(Collector):
    def __init__(self, context: OptimizerContext) -> None:
        self.context = context
        self.records: list[JobRecord] = []

    async def refresh(self) -> None:
        jobs = await self.context.jobs()
        if jobs is not None:  # not connected yet: nothing known, nothing exported
            self.records = await jobs.list()

    def collect(self) -> Iterator[Metric]:
        records = self.records
        by_state = GaugeMetricFamily(
            "slmops_optimizer_jobs", "Optimization jobs in the job store, by state.",
            labels=["state"],
        )  # fmt: skip
        counts = Counter(r.state for r in records)
        for state in get_args(JobState):
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        durations = HistogramMetricFamily(
            "slmops_optimizer_job_duration_seconds",
            "Wall time of the job store's ended jobs, queued to ended, by how they ended.",
            labels=["state"],
        )
        for state in TIMED_STATES:
            took = [(r.updated_at - r.created_at).total_seconds() for r in records
                    if r.state == state]  # fmt: skip
            buckets = [(f"{le:g}", float(sum(1 for s in took if s <= le)))
                       for le in DURATION_BUCKETS_S]  # fmt: skip
            buckets.append(("+Inf", float(len(took))))
            durations.add_metric([state], buckets, sum_value=sum(took))
        yield durations


def register(metrics: ServiceMetrics, context: OptimizerContext) -> JobMetrics:
    jobs = JobMetrics(context)
    metrics.registry.register(jobs)
    metrics.add_refresher("jobs", jobs.refresh, min_interval_s=REFRESH_EVERY_S)
    findings = CounterMetric(
        "slmops_optimizer_field_findings",
        "Field regressions this instance took, by what became of them: open (planned), "
        "replay (a redelivery: the same plan again), busy (another open for the class), "
        "cooling (within the cooldown), decided (already answered).",
        ["decision"], registry=metrics.registry,
    )  # fmt: skip
    context.count_finding = lambda decision: findings.labels(decision).inc()
    return jobs
