"""optimizer event handlers: plain async functions, event in, events out.

``model.published`` (as recorded by the registry, with its manifest digest) fans out one job
per (device class x candidate recipe). ``optimization.planned`` goes out first, then each job's
outcome as soon as it lands — a validator can start on the first variant while the others
still run. Every outcome is published under a deterministic id before the input is acked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from slmops.bus import HandlerResult, Handlers
from slmops.events import (
    CloudEvent,
    FleetRegressionDetected,
    ModelPublished,
    OptimizationPlanned,
    ReleaseCreated,
    ReleaseFailed,
    TransientError,
    derive_event_id,
    new_event,
)
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.dispatch import SOURCE, run_job
from slmops_optimizer.plans import plan_jobs, planned
from slmops_optimizer.reopt_handlers import on_fleet_regression, on_proposal_decided

log = logging.getLogger(__name__)


async def on_model_published(
    event: CloudEvent[ModelPublished], ctx: OptimizerContext
) -> HandlerResult:
    published = event.data
    if published.manifest_digest is None:
        # An upstream announcement the registry has not recorded (and checked) yet: the
        # registry re-announces it with its manifest, and that one is ours.
        log.info("skipping %s %s: not recorded by the registry", published.model_name,
                 published.version)  # fmt: skip
        return None
    jobs_store = await ctx.jobs()
    if jobs_store is None:
        raise TransientError("job store not ready")
    specs, skipped = plan_jobs(published, ctx.profiles, ctx.settings)
    plan = OptimizationPlanned(
        model_name=published.model_name,
        version=published.version,
        parent_digest=published.artifact.digest,
        jobs=planned(specs),
        skipped=skipped,
    )
    plan_id = derive_event_id("optimization.planned", event.id)
    await ctx.bus.publish(new_event(plan, source=SOURCE, event_id=plan_id))
    outcomes = await asyncio.gather(
        *(run_job(spec, ctx, jobs_store) for spec in specs), return_exceptions=True
    )
    # Every job ran to its end before a transient error sends the event back for a retry:
    # finished jobs are then reused from the registry, not recomputed.
    errors: list[BaseException] = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise errors[0]
    return None


def build_handlers(ctx: OptimizerContext) -> Handlers:
    """The event-type -> handler table of the optimizer service (dependencies bound here)."""
    handlers = Handlers()
    handler: Any = functools.partial(on_model_published, ctx=ctx)
    handlers.register(ModelPublished, handler)
    # The field loop (reopt_handlers): a regression becomes a proposal; its release closes it.
    handlers.register(FleetRegressionDetected, functools.partial(on_fleet_regression, ctx=ctx))
    decided: Any = functools.partial(on_proposal_decided, ctx=ctx)
    handlers.register(ReleaseCreated, decided)
    handlers.register(ReleaseFailed, decided)
    return handlers
