"""Jobs per hour with 1 and 2 Ray Serve replicas, each replica count in its own process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.optimizer.common import RAY_JOBS, RAY_PROCESS_TIMEOUT_S, RAY_RESULT, RAY_START_TIMEOUT_S
from slmops.events import variant_id_for
from slmops.events.payloads import Recipe
from slmops_optimizer.jobspec import JobSpec


@dataclass
class RayRun:
    replicas: int
    jobs: int
    wall_s: float = 0.0
    start_s: float = 0.0
    warm_s: float = 0.0
    failed: list[str] = field(default_factory=list)
    error: str = ""
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after

    @property
    def per_hour(self) -> float:
        return 3600 * (self.jobs - len(self.failed)) / self.wall_s if self.wall_s else 0.0


def ray_spec(base: JobSpec, name: str) -> dict[str, Any]:
    recipe = Recipe(name=name, passes=base.recipe.passes)
    spec = base.model_copy(
        update={
            "recipe": recipe,
            "job_id": variant_id_for(base.parent.digest, recipe, base.device_class),
            "intra_op_threads": 1,
        }
    )
    return dict(spec.model_dump(mode="json"))


async def stream_job(compute: Any, spec: dict[str, Any]) -> dict[str, Any]:
    last: dict[str, Any] = {"kind": "failed", "reason": "the stream ended without a result"}
    async for item in compute.stream(spec):
        if item.get("kind") in ("result", "failed", "cancelled"):
            last = item
    return last


async def ray_run(base: JobSpec, replicas: int, jobs: int, work_dir: Path) -> RayRun:
    from slmops_optimizer.compute import Compute
    from slmops_optimizer.settings import OptimizerSettings

    outcome = RayRun(replicas, jobs)
    ray_tmp = Path(tempfile.mkdtemp(prefix="slmops-rb-", dir="/tmp"))
    settings = OptimizerSettings(
        ray_mode="cluster",
        min_replicas=replicas,
        max_replicas=replicas,
        replica_num_cpus=0.5,
        ray_temp_dir=ray_tmp,
        work_dir=work_dir,
        job_threads=1,
    )
    compute = Compute(settings)
    start = time.monotonic()
    await compute.start()
    try:
        if not await compute.wait_ready(RAY_START_TIMEOUT_S):
            outcome.error = (await compute.check()).detail
            return outcome
        outcome.start_s = time.monotonic() - start
        start = time.monotonic()
        warm = await asyncio.gather(
            *(stream_job(compute, ray_spec(base, f"warm-{replicas}-{i}")) for i in range(replicas))
        )
        outcome.warm_s = time.monotonic() - start
        if bad := [w.get("reason", w.get("kind")) for w in warm if w.get("kind") != "result"]:
            outcome.error = f"warm-up job failed: {bad[0]}"
            return outcome
        start = time.monotonic()
        done = await asyncio.gather(
            *(stream_job(compute, ray_spec(base, f"timed-{replicas}-{i}")) for i in range(jobs))
        )
        outcome.wall_s = time.monotonic() - start
        outcome.failed = [
            str(d.get("reason", d.get("kind"))) for d in done if d["kind"] != "result"
        ]
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        await compute.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return outcome


def ray_in_subprocess(base: JobSpec, replicas: int, work_dir: Path) -> RayRun:
    """One replica count in a fresh process: Ray Serve keeps process-wide state that a second
    ``ray.init`` in the same process trips over (stale handles from the first session)."""
    spec_file = work_dir / f"ray-spec-{replicas}.json"
    spec_file.write_text(base.model_dump_json())
    argv = [sys.executable, "-m", "bench.optimizer", "--ray-replicas", str(replicas)]
    argv += ["--ray-jobs", str(RAY_JOBS), "--ray-spec", str(spec_file), "--ray-work", str(work_dir)]
    try:
        done = subprocess.run(
            argv,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=RAY_PROCESS_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return RayRun(replicas, RAY_JOBS, error=f"no answer in {RAY_PROCESS_TIMEOUT_S:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RAY_RESULT):
            return RayRun(**json.loads(line.removeprefix(RAY_RESULT)))
    tail = " | ".join(done.stderr.strip().splitlines()[-5:])[-600:]
    return RayRun(replicas, RAY_JOBS, error=f"exit {done.returncode}: {tail}")


def replica_throughput(base: JobSpec, work_dir: Path) -> list[RayRun]:
    runs = []
    for replicas in (1, 2):
        load = os.getloadavg()[0]
        outcome = ray_in_subprocess(base, replicas, work_dir)
        outcome.load = (load, os.getloadavg()[0])
        print(f"  {replicas} replica(s): {outcome.error or f'{outcome.wall_s:.0f} s wall'}",
              flush=True)  # fmt: skip
        runs.append(outcome)
    return runs


def ray_child(argv: list[str]) -> None:
    """``--ray-replicas N``: run one replica count and print its RayRun as JSON."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--ray-replicas", type=int, required=True)
    parser.add_argument("--ray-jobs", type=int, required=True)
    parser.add_argument("--ray-spec", type=Path, required=True)
    parser.add_argument("--ray-work", type=Path, required=True)
    args = parser.parse_args(argv)
    base = JobSpec.model_validate_json(args.ray_spec.read_text())
    outcome = asyncio.run(ray_run(base, args.ray_replicas, args.ray_jobs, args.ray_work))
    print(RAY_RESULT + json.dumps(dataclasses.asdict(outcome)), flush=True)


def ray_report(runs: list[RayRun], base: JobSpec) -> list[str]:
    lines = [
        f"\n### Jobs per hour: {RAY_JOBS} concurrent {base.model_name} {base.recipe.name} jobs "
        "(1 ONNX Runtime thread each) on real Ray Serve, replicas of 0.5 CPU, 2-core host",
        "| replicas | Serve up (s) | warm-up (s) | wall (s) | jobs/hour | x vs 1 replica "
        "| failed | load avg before / after |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    first = runs[0].per_hour if runs else 0.0
    for r in runs:
        if r.error:
            lines.append(f"| {r.replicas} | error: {r.error} |")
            continue
        ratio = f"{r.per_hour / first:.2f}" if first else "-"
        lines.append(
            f"| {r.replicas} | {r.start_s:.1f} | {r.warm_s:.1f} | {r.wall_s:.1f} "
            f"| {r.per_hour:.0f} | {ratio} | {len(r.failed)} | {r.load[0]:.1f} / {r.load[1]:.1f} |"
        )
    for r in runs:
        lines += [f"- {r.replicas} replica(s) failure: {reason}" for reason in r.failed]
    lines.append(
        "- no numeric target in the issue; wall = first submission to last result; each replica "
        "count ran in its own process (Ray started and stopped with it)"
    )
    return lines
