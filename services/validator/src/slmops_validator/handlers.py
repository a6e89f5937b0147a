"""validator event handlers: plain async functions, event in, events out.

``optimization.completed`` → the variant judged against its class → report stored through the
registry → ``validation.passed``/``failed`` (one id per variant: a redelivery re-sends the same
event, it does not judge again). ``optimization.planned`` and ``optimization.failed`` feed the
version's tally; the handler whose event completes it also publishes the decision:
``release.created``, or ``release.failed`` when no class has a variant to ship.

A re-optimization's events carry a ``release_id`` and the field evidence: its candidates are
judged against the field too (a verdict of their own, beside any the variant had for its
version) and tallied under that id (``releasing``), into a proposed release for one class.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import replace
from typing import Any

import nats.js.errors

from slmops.bus import HandlerResult, Handlers
from slmops.events import (
    CloudEvent,
    OptimizationCompleted,
    OptimizationFailed,
    OptimizationPlanned,
    TransientError,
    ValidationFailed,
    ValidationPassed,
    derive_event_id,
    new_event,
)
from slmops.events.payloads import ArtifactRef
from slmops.jobdirs import owned_dir, remove_orphaned
from slmops.reports import ValidationReport, render_markdown
from slmops_validator.binding import bound_to_manifest, signed_artifact
from slmops_validator.context import ValidatorContext
from slmops_validator.releases import Candidate
from slmops_validator.releasing import SOURCE, Releases
from slmops_validator.scratch import job_root
from slmops_validator.validate import Subject, validate

log = logging.getLogger(__name__)
Outcome = ValidationPassed | ValidationFailed


async def on_completed(
    event: CloudEvent[OptimizationCompleted], ctx: ValidatorContext
) -> HandlerResult:
    done = event.data
    kv = await _state(ctx)
    key = f"validator.variant.{done.variant_id}"
    if done.release_id is not None:  # judged against the field: a verdict of its own
        key += f".{done.release_id}"
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
    parts = (announced,) if done.release_id is None else (announced, done.release_id)
    outcome_id = derive_event_id("validation.outcome", *parts)
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
        **_field_figure(done, outcome),
    )
    releases = await _releases(ctx)
    await releases.add_candidate(done.model_name, done.version, done.release_id, candidate)
    return None


async def on_planned(
    event: CloudEvent[OptimizationPlanned], ctx: ValidatorContext
) -> HandlerResult:
    await (await _releases(ctx)).add_plan(event.data)
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
    releases = await _releases(ctx)
    await releases.add_candidate(failed.model_name, failed.version, failed.release_id, candidate)
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
    if done.field is not None:  # measured beside the candidate: the bytes the registry signed
        regressed, problem = await signed_artifact(
            done.field.variant_id, ctx.registry, await ctx.manifest_keys()
        )
        subject = replace(subject, regressed=regressed, regressed_problem=problem)
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


def _field_figure(done: OptimizationCompleted, outcome: Outcome) -> dict[str, Any]:
    """A candidate judged against the field: its predicted field figure, for the choice."""
    if done.field is None:
        return {}
    name = f"field.{done.field.metric}"
    gate = next((g for g in outcome.gates if g.name == name and g.value is not None), None)
    if gate is None or gate.budget is None:  # not predicted (the gate says why)
        return {}
    return {"field_metric": done.field.metric, "field_value": gate.value,
            "field_bound": done.field.bound}  # fmt: skip


async def _releases(ctx: ValidatorContext) -> Releases:
    return Releases(await _state(ctx), ctx.bus, ctx.profiles)


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
