"""validator event handlers: plain async functions, event in, events out.

``optimization.completed`` → the variant judged against its class → report stored through the
registry → ``validation.passed``/``failed`` (one id per variant: a redelivery re-sends the same
event, it does not judge again). ``optimization.planned`` and ``optimization.failed`` feed the
version's tally; the handler whose event completes it also publishes the decision:
``release.created``, or ``release.failed`` when no class has a variant to ship.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, Literal

import nats.js.errors

from slmops.bus import HandlerResult, Handlers
from slmops.events import (
    CloudEvent,
    OptimizationCompleted,
    OptimizationFailed,
    OptimizationPlanned,
    ReleaseCreated,
    TransientError,
    ValidationFailed,
    ValidationPassed,
    derive_event_id,
    new_event,
)
from slmops.events.payloads import ArtifactRef
from slmops.jobdirs import owned_dir, remove_orphaned
from slmops.reports import ValidationReport, render_markdown
from slmops_validator.binding import bound_to_manifest
from slmops_validator.context import ValidatorContext
from slmops_validator.releases import Candidate, Tally, choose, update_tally
from slmops_validator.scratch import job_root
from slmops_validator.validate import Subject, validate

log = logging.getLogger(__name__)
SOURCE = "/slmops/validator"
Outcome = ValidationPassed | ValidationFailed


async def on_completed(
    event: CloudEvent[OptimizationCompleted], ctx: ValidatorContext
) -> HandlerResult:
    done = event.data
    kv = await _state(ctx)
    key = f"validator.variant.{done.variant_id}"
    try:  # judged before (a redelivery, a re-announced reused variant): same outcome again,
        # announced for the version at hand (a reused variant serves a new version too)
        stored = json.loads((await kv.get(key)).value or b"{}")
        kind = ValidationPassed if stored["verdict"] == "passed" else ValidationFailed
        outcome: Outcome = kind.model_validate({**stored["outcome"], **_version_of(done)})
    except nats.js.errors.KeyNotFoundError:
        outcome = await _judge(done, ctx)
        verdict = "passed" if isinstance(outcome, ValidationPassed) else "failed"
        record = {"verdict": verdict, "outcome": outcome.model_dump(mode="json")}
        await kv.put(key, json.dumps(record).encode())
    announced = f"{done.model_name}/{done.version}/{done.variant_id}"
    outcome_id = derive_event_id("validation.outcome", announced)
    await ctx.bus.publish(new_event(outcome, source=SOURCE, event_id=outcome_id))
    passed = isinstance(outcome, ValidationPassed)
    candidate = Candidate(
        variant_id=done.variant_id,
        device_class=done.device_class,
        recipe_name=done.recipe.name,
        verdict="passed" if passed else "failed",
        reason=getattr(outcome, "reason", ""),
        artifact=done.artifact,
        manifest_digest=done.manifest_digest,
        latency_p50_ms=_latency_p50(outcome),
    )
    await _record(ctx, done.model_name, done.version, candidate)
    return None


async def on_planned(
    event: CloudEvent[OptimizationPlanned], ctx: ValidatorContext
) -> HandlerResult:
    plan = event.data

    def add_plan(tally: Tally) -> None:
        tally.planned = {job.variant_id: job.device_class for job in plan.jobs}
        tally.skipped = dict(plan.skipped)

    await _update(ctx, plan.model_name, plan.version, add_plan)
    return None


async def on_optimization_failed(
    event: CloudEvent[OptimizationFailed], ctx: ValidatorContext
) -> HandlerResult:
    failed = event.data
    if failed.variant_id is None or failed.device_class is None:
        return None  # not one planned job: nothing for a tally to wait on
    candidate = Candidate(
        variant_id=failed.variant_id,
        device_class=failed.device_class,
        recipe_name=failed.recipe_name or "",
        verdict="optimization_failed",
        reason=f"optimization failed: {failed.reason}",
    )
    await _record(ctx, failed.model_name, failed.version, candidate)
    return None


async def _judge(done: OptimizationCompleted, ctx: ValidatorContext) -> Outcome:
    profile = ctx.profiles.get(done.device_class)
    if profile is None:
        return _failed(
            done,
            None,
            f"no profile for device class {done.device_class!r} in {ctx.settings.profiles_dir}",
        )
    done, variant = await bound_to_manifest(done, ctx.registry, await ctx.manifest_keys())
    version = await ctx.registry.model_version(done.model_name, done.version)
    manifest = version["manifest"]
    eval_set = (
        ArtifactRef.model_validate(manifest["eval_set"]) if manifest.get("eval_set") else None
    )
    subject = Subject(done, manifest.get("task") or "feature-extraction", eval_set)
    async with ctx.slots:
        report = await validate(subject, profile, ctx.models, ctx.settings)
    ref = await _store_report(report, variant.digest, ctx)
    log.info(
        "%s %s for %s: %s",
        done.variant_id,
        report.verdict,
        done.device_class,
        report.reason or "every gate holds",
    )
    if report.verdict == "passed":
        return ValidationPassed(**_common(done), report=ref, gates=report.gates)
    return _failed(done, ref, report.reason, report)


async def _store_report(
    report: ValidationReport, variant_manifest_digest: str, ctx: ValidatorContext
) -> ArtifactRef:
    """The report as a blob, then recorded (signed) by the registry against the variant."""
    report = report.model_copy(update={"markdown": render_markdown(report)})
    with owned_dir(job_root(ctx.settings), "report") as tmp:
        path = tmp / "report.json"
        path.write_bytes(report.to_json())
        blob = await asyncio.to_thread(ctx.store.put_file, path)
    metrics = {g.name: g.value for g in report.gates if g.value is not None}
    await ctx.registry.add_report(
        report.variant_id,
        {
            "report_digest": blob.digest,
            "verdict": report.verdict,
            "metrics": metrics,
            "variant_manifest_digest": variant_manifest_digest,
            "artifact_digest": report.candidate.digest,
        },
    )
    return ArtifactRef(
        digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri, media_type="application/json"
    )


def _failed(
    done: OptimizationCompleted,
    ref: ArtifactRef | None,
    reason: str,
    report: ValidationReport | None = None,
) -> ValidationFailed:
    gates = report.gates if report else []
    return ValidationFailed(**_common(done), report=ref, gates=gates, reason=reason)


def _version_of(done: OptimizationCompleted) -> dict[str, Any]:
    return {"model_name": done.model_name, "version": done.version}


def _common(done: OptimizationCompleted) -> dict[str, Any]:
    return {**_version_of(done), "variant_id": done.variant_id, "device_class": done.device_class}


def _latency_p50(outcome: Outcome) -> float | None:
    """The candidate's host p50 - per inference, or per output token of a decoder - when
    latency was measured (the 'fastest' objective)."""
    for gate in outcome.gates:
        if gate.name in ("latency.p50_ms", "generation.tpot_p50_ms") and gate.value is not None:
            return gate.value
    return None


async def _record(
    ctx: ValidatorContext, model_name: str, version: str, candidate: Candidate
) -> None:
    def add(tally: Tally) -> None:
        tally.judged[candidate.variant_id] = candidate

    await _update(ctx, model_name, version, add)


async def _update(ctx: ValidatorContext, model_name: str, version: str, change: Any) -> None:
    """Apply a change to the version's tally; the change that completes it releases."""
    kv = await _state(ctx)
    tally = await update_tally(kv, model_name, version, change)
    if not tally.complete or tally.released:
        return
    release = choose(tally, ctx.profiles)
    created = isinstance(release, ReleaseCreated)
    outcome: Literal["created", "failed"] = "created" if created else "failed"
    if not created:
        why = "; ".join(f"{e.device_class}: {e.reason}" for e in release.entries)
        log.warning("%s %s: no release, no class has a variant (%s)", model_name, version, why)
    # Published before the tally says "released": a crash in between re-sends it on
    # redelivery under the same id, which JetStream de-duplicates. One decision per version,
    # so one id whichever way it went.
    await ctx.bus.publish(
        new_event(release, source=SOURCE, event_id=derive_event_id("release", release.release_id))
    )

    def mark(t: Tally) -> None:
        t.released, t.outcome = True, outcome

    await update_tally(kv, model_name, version, mark)


async def _state(ctx: ValidatorContext) -> Any:
    kv = await ctx.state()
    if kv is None:
        raise TransientError("validation state store not ready")
    return kv


def build_handlers(ctx: ValidatorContext) -> Handlers:
    """The event-type -> handler table of the validator service (dependencies bound here)."""
    remove_orphaned(job_root(ctx.settings))  # at start: what jobs killed mid-way left behind
    handlers = Handlers()
    for payload, handler in (
        (OptimizationCompleted, on_completed),
        (OptimizationPlanned, on_planned),
        (OptimizationFailed, on_optimization_failed),
    ):
        bound: Any = functools.partial(handler, ctx=ctx)
        handlers.register(payload, bound)
    return handlers
