"""What the optimizer's handlers and API share: settings, profiles, compute, registry, jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from slmops.bus import Bus
from slmops.profiles import DeviceProfile
from slmops.service import ServiceRuntime
from slmops.service.registry_api import RegistryClient
from slmops_optimizer.compute import Compute
from slmops_optimizer.jobs import JobStore
from slmops_optimizer.recipe_check import check_recipes
from slmops_optimizer.reopt_state import Bounds, ReoptimizationLoop, utc_now
from slmops_optimizer.settings import OptimizerSettings

JOBS_BUCKET = "slmops-jobs"


@dataclass
class OptimizerContext:
    settings: OptimizerSettings
    profiles: dict[str, DeviceProfile]
    compute: Compute
    registry: RegistryClient
    # Set by app.py once the runtime exists (the runtime needs the handlers, which need this).
    runtime: ServiceRuntime | None = None
    clock: Callable[[], datetime] = utc_now
    #: Counts what became of each field finding (set by metrics.register): decision -> +1.
    count_finding: Callable[[str], None] = lambda decision: None
    _jobs: JobStore | None = field(default=None, init=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_recipes(self.profiles)  # a typo in a recipe fails at start-up, not in a job

    @property
    def bus(self) -> Bus:
        bus = self.runtime.bus if self.runtime else None
        if bus is None:
            raise RuntimeError("not connected to NATS yet")
        return bus

    @property
    def slots(self) -> asyncio.Semaphore:
        """Bounds the jobs in flight from this service, whatever the number of events."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent_jobs)
        return self._slots

    async def jobs(self) -> JobStore | None:
        """The job store, once NATS is connected and its bucket declared; else None."""
        kv = await self.runtime.key_value(JOBS_BUCKET) if self.runtime else None
        if kv is None:
            return None
        if self._jobs is None:
            self._jobs = JobStore(kv)
        return self._jobs

    async def reoptimizations(self) -> ReoptimizationLoop | None:
        """The bound on re-optimizations (kept beside the jobs), once NATS is connected."""
        kv = await self.runtime.key_value(JOBS_BUCKET) if self.runtime else None
        if kv is None:
            return None
        bounds = Bounds(cooldown_s=self.settings.reoptimize_cooldown_s,
                        open_max_s=self.settings.reoptimize_open_max_s)  # fmt: skip
        return ReoptimizationLoop(kv, bounds)
