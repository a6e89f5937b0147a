"""The optimizer's side of the field loop: a regression found on a device class becomes a plan
of candidates for that class, run like any other jobs, for a proposed release.

``fleet.regression.detected`` -> (bounded: one open per model and class, then a cooldown)
``optimization.planned`` with ``release_id = field_release_id(model, version, detection)`` and
the field evidence -> each candidate's ``optimization.completed``/``failed`` carrying both. The
validator judges them against the field budget and answers with ``release.created`` or
``release.failed`` carrying the evidence as ``proposal``, which closes the loop's entry here.
A plan with no job says why in ``skipped``: the validator turns it into ``release.failed``.

Ids are derived from the finding: the plan's from the release id, each outcome's from the
release id and variant id, so a redelivered finding re-publishes the same events (and replays
the plan recorded when it opened, see ``reopt_state``) instead of making a second proposal.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from slmops.bus import HandlerResult
from slmops.events import (
    CloudEvent,
    FleetRegressionDetected,
    ModelPublished,
    OptimizationPlanned,
    ReleaseCreated,
    ReleaseFailed,
    TransientError,
    derive_event_id,
    field_release_id,
    new_event,
)
from slmops.events.payloads import Recipe
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.dispatch import SOURCE, run_job
from slmops_optimizer.jobs import JobStore
from slmops_optimizer.plans import job_spec, planned, published_from_manifest
from slmops_optimizer.reopt_evidence import known_figures
from slmops_optimizer.reopt_state import Reoptimization, decide
from slmops_optimizer.reoptimize import candidates_for, rank

log = logging.getLogger(__name__)
IGNORED = ("busy", "cooling", "decided")


async def on_fleet_regression(
    event: CloudEvent[FleetRegressionDetected], ctx: OptimizerContext
) -> HandlerResult:
    finding = event.data
    loop, jobs_store = await ctx.reoptimizations(), await ctx.jobs()
    if loop is None or jobs_store is None:
        raise TransientError("job store not ready")
    now = ctx.clock()
    current = await loop.get(finding.model_name, finding.device_class)
    decision = decide(current, finding.detection_id, now, loop.bounds)
    if decision in IGNORED:
        _ignore(ctx, finding, decision, current)
        return None
    published = published_from_manifest(
        await ctx.registry.model_version(finding.model_name, finding.version)
    )
    entry = current
    if decision != "replay" or entry is None:
        recipes, reason = await plan_candidates(finding, published, ctx)
        opening = Reoptimization(
            model_name=finding.model_name, device_class=finding.device_class,
            detection_id=finding.detection_id, version=finding.version,
            release_id=field_release_id(finding.model_name, finding.version,
                                        finding.detection_id),
            recipes=recipes, skipped_reason=reason,
        )  # fmt: skip
        decision, entry = await loop.begin(opening, now)  # another instance may have won
        if decision in IGNORED:
            _ignore(ctx, finding, decision, entry)
            return None
    ctx.count_finding(decision)
    await _propose(finding, published, entry, ctx, jobs_store)
    return None


def _ignore(
    ctx: OptimizerContext, finding: FleetRegressionDetected, decision: str,
    current: Reoptimization | None,
) -> None:  # fmt: skip
    ctx.count_finding(decision)
    what = {
        "busy": "another re-optimization of the class is open",
        "cooling": "the class's last re-optimization was decided less than "
        f"{ctx.settings.reoptimize_cooldown_s:g} s ago (SLMOPS_OPTIMIZER_REOPTIMIZE_COOLDOWN_S)",
        "decided": "this finding was answered already",
    }[decision]
    log.info("field regression %s of %s %s on %s ignored: %s (%s)", finding.detection_id,
             finding.model_name, finding.version, finding.device_class, what,
             current.detection_id if current else "-")  # fmt: skip


async def plan_candidates(
    finding: FleetRegressionDetected, published: ModelPublished, ctx: OptimizerContext
) -> tuple[list[Recipe], str | None]:
    """The candidates' recipes, best first; or none and the reason."""
    evidence = finding.evidence()
    profile = ctx.profiles.get(finding.device_class)
    if profile is None:
        return [], (f"no recipe left that could meet {evidence.metric} in the field: no device "
                    f"profile named {finding.device_class!r}")  # fmt: skip
    regressed = await ctx.registry.variant(finding.variant_id)
    regressed_recipe = (
        Recipe.model_validate(regressed["manifest"]["recipe"])
        if regressed and regressed["manifest"].get("recipe")
        else None
    )
    parent = published.artifact.digest
    candidates = candidates_for(profile, published.format, published.task, parent,
                                finding.variant_id, regressed_recipe)  # fmt: skip
    known = await known_figures(ctx.registry, evidence, parent, regressed_recipe, candidates,
                                ctx.profiles)  # fmt: skip
    ranking = rank(evidence, candidates, known, ctx.settings.reoptimize_max_candidates)
    for candidate, why in ranking.dropped:
        log.info("re-optimization %s: %s dropped: %s", finding.detection_id,
                 candidate.recipe.name, why)  # fmt: skip
    if not ranking.chosen:
        none = f"the class has no other recipe for {published.format} {published.task} models"
        return [], ranking.nothing_left(evidence, none)
    return [r.candidate.recipe for r in ranking.chosen], None


async def _propose(
    finding: FleetRegressionDetected, published: ModelPublished, entry: Reoptimization,
    ctx: OptimizerContext, jobs_store: JobStore,
) -> None:  # fmt: skip
    """Announce the plan recorded for the finding, then run its jobs like a version's."""
    profile = ctx.profiles.get(finding.device_class)
    recipes = entry.recipes if profile else []
    specs = [job_spec(published, profile, r, ctx.settings) for r in recipes if profile]
    reason = entry.skipped_reason or f"no device profile named {finding.device_class!r}"
    release_id, evidence = entry.release_id, finding.evidence()
    plan = OptimizationPlanned(
        model_name=published.model_name, version=published.version,
        parent_digest=published.artifact.digest, jobs=planned(specs),
        skipped={} if specs else {finding.device_class: reason},
        release_id=release_id, field=evidence,
    )  # fmt: skip
    plan_id = derive_event_id("optimization.planned", release_id)
    await ctx.bus.publish(new_event(plan, source=SOURCE, event_id=plan_id))
    log.info("field regression %s: proposal %s plans %s", finding.detection_id, release_id,
             ", ".join(s.recipe.name for s in specs) or f"nothing ({reason})")  # fmt: skip
    outcomes = await asyncio.gather(
        *(run_job(s, ctx, jobs_store, release_id=release_id, field=evidence) for s in specs),
        return_exceptions=True,
    )
    errors: list[BaseException] = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise errors[0]  # redelivered: the recorded plan replays, finished jobs are reused


async def on_proposal_decided(event: CloudEvent[Any], ctx: OptimizerContext) -> HandlerResult:
    """``release.created``/``release.failed`` of a proposal closes its re-optimization."""
    data: ReleaseCreated | ReleaseFailed = event.data
    if data.proposal is None:
        return None  # a version's own release
    loop = await ctx.reoptimizations()
    if loop is None:
        raise TransientError("job store not ready")
    outcome: Literal["created", "failed"] = (
        "created" if isinstance(data, ReleaseCreated) else "failed"
    )
    closed = await loop.close(data.model_name, data.proposal, outcome, ctx.clock())
    log.info("proposal %s of %s for %s: %s%s", data.release_id, data.model_name,
             data.proposal.device_class, outcome,
             "; the class's re-optimization is closed" if closed else "")  # fmt: skip
    return None
