"""Which jobs a published model version gets: one per (device class x applicable recipe)."""

from __future__ import annotations

from typing import Any

from slmops.events import ModelPublished, variant_id_for
from slmops.events.payloads import PlannedJob, Recipe
from slmops.profiles import DeviceProfile
from slmops_optimizer.jobspec import JobSpec
from slmops_optimizer.settings import OptimizerSettings


def plan_jobs(
    published: ModelPublished, profiles: dict[str, DeviceProfile], settings: OptimizerSettings
) -> tuple[list[JobSpec], dict[str, str]]:
    """The jobs, and the device classes that get none with the reason."""
    jobs: list[JobSpec] = []
    skipped: dict[str, str] = {}
    for name in published.device_classes or sorted(profiles):
        profile = profiles.get(name)
        if profile is None:
            skipped[name] = (
                f"no device profile named {name!r} (known: {', '.join(sorted(profiles))})"
            )
            continue
        candidates = profile.candidates(published.format, published.task)
        if not candidates:
            skipped[name] = (
                f"no recipe of {name} applies to {published.format} {published.task} models"
            )
            continue
        jobs += [job_spec(published, profile, c.recipe(), settings) for c in candidates]
    return jobs, skipped


def job_spec(
    published: ModelPublished, profile: DeviceProfile, recipe: Recipe, settings: OptimizerSettings
) -> JobSpec:
    """The job that makes ``recipe``'s variant of the published model for ``profile``'s class."""
    return JobSpec(
        job_id=variant_id_for(published.artifact.digest, recipe, profile.name),
        model_name=published.model_name,
        version=published.version,
        device_class=profile.name,
        task=published.task,
        format=published.format,
        parent=published.artifact,
        eval_set=published.eval_set,
        embedding_output=published.embedding_output,
        pooling=published.pooling,
        recipe=recipe,
        floors=profile.quality,
        search=profile.search,
        precisions=list(profile.precisions),
        max_source_size_mb=settings.max_source_size_mb,
        intra_op_threads=settings.job_threads,
    )


def published_from_manifest(signed: dict[str, Any]) -> ModelPublished:
    """A model version as ``model.published`` announced it, from its signed manifest (as the
    registry's API returns it): what a job needs when no event is at hand."""
    manifest = signed["manifest"]
    details = manifest.get("details") or {}
    return ModelPublished.model_validate(
        {
            **{k: manifest.get(k) for k in ("model_name", "version", "format", "task",
                                            "artifact", "eval_set")},
            "manifest_digest": signed["digest"],
            "labels": manifest.get("labels") or {},
            "device_classes": manifest.get("device_classes") or [],
            "embedding_output": details.get("embedding_output") or None,
            "pooling": details.get("pooling") or None,
        }
    )  # fmt: skip


def planned(jobs: list[JobSpec]) -> list[PlannedJob]:
    return [
        PlannedJob(variant_id=j.job_id, device_class=j.device_class, recipe_name=j.recipe.name)
        for j in jobs
    ]
