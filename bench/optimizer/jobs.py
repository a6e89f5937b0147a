"""Infrastructure and jobs: moto S3, the store, the real ``JobRunner`` per class and recipe."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.optimizer.common import (
    ACCESS_KEY,
    BUCKET,
    MB,
    REGION,
    SECRET_KEY,
    THREADS,
    Case,
    Job,
    Variant,
)
from slmops.cli.packaging import pack_directory
from slmops.events import variant_id_for
from slmops.events.payloads import ArtifactRef
from slmops.objectstore import ObjectStore
from slmops.profiles import DeviceProfile
from slmops.settings import PlatformSettings
from slmops_optimizer.jobspec import JobSpec
from slmops_optimizer.passes import create_pass
from slmops_optimizer.runner import JobRunner
from slmops_optimizer.workspace import Workspace, load_converted


@contextlib.contextmanager
def s3_store(var_dir: Path) -> Iterator[ObjectStore]:
    """A moto S3 server and the ``SLMOPS_*`` env pointing at it (restored afterwards)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "SLMOPS_ENV": "local",
        "SLMOPS_VAR_DIR": str(var_dir),
        "SLMOPS_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "SLMOPS_S3_REGION": REGION,
        "SLMOPS_S3_BUCKET": BUCKET,
        "SLMOPS_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "SLMOPS_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    store = ObjectStore.from_settings(PlatformSettings())
    try:
        store.ensure_bucket()
        yield store
    finally:
        store.close()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def publish(store: ObjectStore, case: Case, tmp: Path) -> ArtifactRef:
    if case.path.is_dir():
        tar = tmp / f"{case.name}.tar"
        with tar.open("wb") as out:
            pack_directory(case.path, out)
        blob = store.put_file(tar)
        tar.unlink()
    else:
        blob = store.put_file(case.path)
    return ArtifactRef(digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri)


def plan(case: Case, parent: ArtifactRef, profiles: dict[str, DeviceProfile]) -> list[Job]:
    """One job per (class x applicable recipe), built as ``plans.plan_jobs`` builds them."""
    jobs = []
    for name in case.classes or sorted(profiles):
        profile = profiles.get(name)
        if profile is None:
            print(f"  (no profile named {name!r}: skipped)")
            continue
        for candidate in profile.candidates(case.fmt, case.task):
            recipe = candidate.recipe()
            spec = JobSpec(
                job_id=variant_id_for(parent.digest, recipe, name),
                model_name=case.name,
                version="bench",
                device_class=name,
                task=case.task,
                format=case.fmt,
                parent=parent,
                recipe=recipe,
                floors=profile.quality,
                search=profile.search,
                precisions=list(profile.precisions),
                max_source_size_mb=4096,
                intra_op_threads=THREADS,
            )
            jobs.append(Job(name, profile, spec))
    return jobs


def run_jobs(jobs: list[Job], workspace: Workspace, out_dir: Path) -> dict[str, Variant]:
    """Run every job; download each distinct variant (keyed by its effective passes)."""
    runner = JobRunner(workspace)
    variants: dict[str, Variant] = {}
    for job in jobs:
        start = time.monotonic()
        last_step = ["start"]

        def progress(_fraction: float, step: str, last_step: list[str] = last_step) -> None:
            last_step[0] = step

        try:
            # ONNX Runtime's calibrators print progress to stdout: keep the tables readable.
            with contextlib.redirect_stdout(io.StringIO()):
                job.result = runner.run(job.spec, progress, lambda: False)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            job.error = f"{type(exc).__name__} at '{last_step[0]}': {text[0] if text else ''}"
        job.wall_s = time.monotonic() - start
        result = job.result
        if result is None:
            print(f"  {job.device_class} / {job.recipe}: FAILED after {job.wall_s:.0f} s: "
                  f"{job.error}", flush=True)  # fmt: skip
            continue
        key = json.dumps(result.effective_recipe.model_dump(mode="json")["passes"], sort_keys=True)
        if key not in variants:
            path = out_dir / f"{result.job_id}.onnx"
            workspace.store.get_to_file(result.artifact_digest, path)
            variants[key] = Variant(f"V{len(variants) + 1}", path, result.size_bytes / MB)
        job.variant = variants[key]
        quick = ", ".join(
            f"{e.quality_metric} {e.quality:.4f}{'*' if e.meets_floor else ''}"
            for e in result.trail
        )
        print(
            f"  {job.device_class} / {job.recipe}: {result.size_bytes / MB:.1f} MB in "
            f"{job.wall_s:.0f} s (job {result.duration_s:.0f} s), {job.variant.label}; "
            f"tries: {quick or 'none'} (* = floor met)",
            flush=True,
        )
    return variants


def reference(workspace: Workspace, jobs: list[Job]) -> tuple[Path, Any] | None:
    """The fp32 ONNX model and tokenizer the conversion kept (the same cache the jobs used)."""
    spec = next((j.spec for j in jobs if j.result is not None), None)
    if spec is None:
        return None
    source = workspace.source(spec)
    convert = create_pass("convert", dict(spec.recipe.passes[0].config))
    with workspace.converted(source, convert.config.model_dump(mode="json")) as folder:
        kept = load_converted(folder)
    if kept is None:
        return None
    model_path, tokenizer, _metrics = kept
    return model_path, tokenizer
