"""One job from the service's side: reuse, run on Ray Serve, record, announce.

A stored variant with the job's id means the work was done before (a repeated publish, a
redelivered event): the job is marked ``reused`` and its ``optimization.completed`` is sent
again under the same event id, which JetStream de-duplicates. Otherwise the job streams from a
compute replica, its progress lands in the job store, a cancel request closes the stream, and
the result is registered as a variant before the event is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from slmops.events import (
    CloudEvent,
    OptimizationCompleted,
    OptimizationFailed,
    TransientError,
    derive_event_id,
    new_event,
)
from slmops.events.payloads import ArtifactRef, FieldEvidence
from slmops_optimizer.compute import HEARTBEAT_S
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.jobs import JobStore
from slmops_optimizer.jobspec import JobResult, JobSpec

log = logging.getLogger(__name__)
SOURCE = "/slmops/optimizer"
_PROGRESS_EVERY_S = 1.0


async def run_job(
    spec: JobSpec, ctx: OptimizerContext, jobs: JobStore, *, release_id: str | None = None,
    field: FieldEvidence | None = None,
) -> CloudEvent[Any]:  # fmt: skip
    """Run (or reuse) one job and return its outcome event, already published.

    ``release_id`` and ``field``: the job is a candidate of a re-optimization's proposed
    release (its outcome says so, and gets an id of its own: a variant the version's own
    release made too is announced again, for the proposal)."""
    candidate: dict[str, Any] = {"release_id": release_id, "field": field}
    await jobs.create(spec)
    stored = await ctx.registry.variant(spec.job_id)
    if stored is not None:
        await jobs.update(spec.job_id, state="reused", progress=1.0, step="reused stored variant",
                          result_digest=stored["manifest"]["artifact"]["digest"])  # fmt: skip
        reused = completed_from_manifest(spec, stored)
        return await _publish(ctx, reused.model_copy(update=candidate))
    async with ctx.slots:
        if not await ctx.compute.wait_ready(ctx.settings.ray_start_timeout_s):
            await jobs.update(spec.job_id, state="queued", step="waiting for Ray Serve")
            raise TransientError("Ray Serve is not ready; the job will be retried")
        await jobs.update(spec.job_id, state="running", step="starting")
        final = await _stream(spec, ctx, jobs)
    kind = final.get("kind")
    if kind == "result":
        result = JobResult.model_validate(final["result"])
        manifest = await ctx.registry.register_variant(variant_request(spec, result))
        await jobs.update(spec.job_id, state="succeeded", progress=1.0, step="stored",
                          result_digest=result.artifact_digest, size_bytes=result.size_bytes,
                          duration_s=result.duration_s)  # fmt: skip
        completed = completed_from_manifest(spec, manifest)
        return await _publish(ctx, completed.model_copy(update=candidate))
    if kind == "failed" and final.get("transient"):
        await jobs.update(spec.job_id, state="queued", step=f"retrying: {final['reason']}")
        raise TransientError(final["reason"])
    state = "cancelled" if kind == "cancelled" else "failed"
    reason = final.get("reason") or "cancelled on request"
    await jobs.update(spec.job_id, state=state, step=state, error=reason)
    failed = OptimizationFailed(
        model_name=spec.model_name,
        version=spec.version,
        device_class=spec.device_class,
        recipe_name=spec.recipe.name,
        variant_id=spec.job_id,
        reason=reason,
        release_id=release_id,
    )
    return await _publish(ctx, failed)


async def _stream(spec: JobSpec, ctx: OptimizerContext, jobs: JobStore) -> dict[str, Any]:
    """Follow the replica's stream to its last message; cancel or time out by closing it.

    Until its first update the job may wait for a replica (Ray Serve queues it behind running
    jobs, or while a replica starts): only ``job_timeout_s`` bounds that. Once running, a
    replica that says nothing, not even a heartbeat, for ``replica_silence_s`` is lost (its
    process died, its stream broke without an error): the job is retried, never awaited for
    good."""
    stream = ctx.compute.stream(spec.model_dump(mode="json"))
    updates = aiter(stream)
    deadline = time.monotonic() + ctx.settings.job_timeout_s
    silence_s = ctx.settings.replica_silence_s
    ran_too_long = {"kind": "failed", "transient": False,
                    "reason": f"the job ran longer than {ctx.settings.job_timeout_s:g} s "
                              "(SLMOPS_OPTIMIZER_JOB_TIMEOUT_S)"}  # fmt: skip
    running, last_write = False, 0.0
    try:
        while True:
            wait_s = silence_s if running else max(deadline - time.monotonic(), 0.0)
            try:
                update = await asyncio.wait_for(anext(updates), wait_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                if not running:
                    return ran_too_long
                why = (f"the replica sent nothing for {silence_s:g} s (a running job sends a "
                       f"heartbeat every {HEARTBEAT_S:g} s): taken for lost")  # fmt: skip
                return {"kind": "failed", "transient": True, "reason": why}
            running = True
            kind = update.get("kind")
            if kind not in ("progress", "heartbeat"):
                return dict(update)
            if time.monotonic() > deadline:
                return ran_too_long
            now = time.monotonic()
            if kind == "progress" or now - last_write > _PROGRESS_EVERY_S:
                changes = (
                    {"progress": update["progress"], "step": update["step"]}
                    if kind == "progress"
                    else {}  # a heartbeat: touch the record, and read a pending cancel
                )
                record = await jobs.update(spec.job_id, **changes)
                last_write = now
                if record.cancel_requested:
                    return {"kind": "cancelled"}
    finally:
        with contextlib.suppress(Exception):
            stream.cancel()
    return {"kind": "failed", "transient": True, "reason": "the replica's stream ended early"}


def variant_request(spec: JobSpec, result: JobResult) -> dict[str, Any]:
    return {
        "model_name": spec.model_name,
        "version": spec.version,
        "variant_id": spec.job_id,
        "device_class": spec.device_class,
        "recipe": spec.recipe.model_dump(mode="json"),
        "format": "onnx",
        "artifact_digest": result.artifact_digest,
        "metrics": {**result.metrics, "duration_s": result.duration_s},
        "details": {
            "effective_recipe": result.effective_recipe.model_dump(mode="json"),
            "search_trail": [t.model_dump(mode="json") for t in result.trail],
            "pass_log": result.log,
            "reference": result.reference.model_dump(mode="json") if result.reference else None,
            **result.details,
        },
    }


def completed_from_manifest(spec: JobSpec, signed: dict[str, Any]) -> OptimizationCompleted:
    manifest = signed["manifest"]
    metrics = dict(manifest.get("metrics", {}))
    reference = (manifest.get("details") or {}).get("reference")
    return OptimizationCompleted(
        model_name=spec.model_name,
        version=spec.version,
        variant_id=spec.job_id,
        device_class=spec.device_class,
        parent_digest=spec.parent.digest,
        recipe=spec.recipe,
        artifact=ArtifactRef.model_validate(manifest["artifact"]),
        manifest_digest=signed["digest"],
        duration_s=float(metrics.get("duration_s", 0.0)),
        metrics=metrics,
        reference=ArtifactRef.model_validate(reference) if reference else None,
    )


async def _publish(
    ctx: OptimizerContext, payload: OptimizationCompleted | OptimizationFailed
) -> CloudEvent[Any]:
    event = new_event(payload, source=SOURCE, event_id=outcome_id_for(payload))
    await ctx.bus.publish(event)
    return event


def outcome_id_for(payload: OptimizationCompleted | OptimizationFailed) -> str:
    """One outcome per job: completed and failed share the id, so a repeat is de-duplicated.

    The model version is part of it: a variant reused for a new version (the same artifact
    published again) is a new announcement, which JetStream must not drop as a duplicate. So is
    the release a re-optimization proposes: its candidate may be a variant the version's own
    release announced already."""
    if payload.release_id is not None:
        return derive_event_id("optimization.outcome", payload.release_id, payload.variant_id or "")
    job = f"{payload.model_name}/{payload.version}/{payload.variant_id}"
    return derive_event_id("optimization.outcome", job)
