"""The report of one model: held-out floors, the search choice per class, tables, targets."""

from __future__ import annotations

from bench.optimizer.common import (
    MB,
    MINI_MIN_COSINE,
    MINI_MIN_FASTER,
    MINI_MIN_SMALLER,
    SMOL_MAX_MB,
    SMOL_MAX_P50_RATIO,
    SMOL_MIN_TOP1,
    THREADS,
    Case,
    Job,
    Variant,
)
from bench.optimizer.measure import p50, p95
from slmops.profiles import DeviceProfile


def held_out_ok(task: str, model: Variant | None, profile: DeviceProfile) -> bool:
    if model is None or not model.quality:
        return False
    floors = profile.quality
    if task == "feature-extraction":
        return floors.min_cosine is None or model.quality["cosine_mean"] >= floors.min_cosine
    top1_ok = (
        floors.min_top1_agreement is None or model.quality["top1"] >= floors.min_top1_agreement
    )
    ppl_ok = (
        floors.max_perplexity_increase_pct is None
        or model.quality["ppl_increase_pct"] <= floors.max_perplexity_increase_pct
    )
    return top1_ok and ppl_ok


def choose(task: str, jobs: list[Job]) -> dict[str, Job | None]:
    chosen: dict[str, Job | None] = {}
    for job in jobs:
        chosen.setdefault(job.device_class, None)
        if not (job.floor_met and held_out_ok(task, job.variant, job.profile)):
            continue
        assert job.variant is not None
        best = chosen[job.device_class]
        if job.profile.objective == "fastest":
            better = best is None or p50(job.variant) < p50(best.variant)  # type: ignore[arg-type]
        else:
            better = best is None or job.variant.size_mb < best.variant.size_mb  # type: ignore[union-attr]
        if better:
            chosen[job.device_class] = job
    return chosen


def report(
    case: Case,
    parent_mb: float,
    jobs: list[Job],
    fp32: Variant,
    models: list[Variant],
    rounds: int,
    timings: list[tuple[str, float]],
) -> list[str]:
    encoder = case.task == "feature-extraction"
    chosen = choose(case.task, jobs)
    lines = [
        f"\n### {case.name} ({case.fmt}): variants vs the fp32 model, ONNX Runtime CPU, "
        f"{THREADS} threads, p50/p95 of {rounds} interleaved rounds"
        + (" (8x128: every third round)" if encoder else "")
        + f"; source artifact {case.name} {parent_mb:.1f} MB",
    ]
    if encoder:
        lines += [
            "| # | class / recipe / kept try | MB | x smaller | p50 ms b1x128 | p95 ms "
            "| x faster | p50 ms b8x128 | x faster b8 | cosine mean | cosine min "
            "| floor met (search / held-out) | chosen |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
    else:
        lines += [
            "| # | class / recipe / kept try | MB | x smaller | p50 ms 1x128 | p95 ms "
            "| x faster | p50 ms 1x1 | x faster 1x1 | top-1 agreement | perplexity fp32 -> "
            "variant | floor met (search / held-out) | chosen |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
    second = "b8" if encoder else "t1"

    def timing(model: Variant) -> str:
        if not model.latency:
            return "| - | - | - | - | - "
        return (
            f"| {p50(model):.1f} | {p95(model):.1f} | {p50(fp32) / p50(model):.2f} "
            f"| {p50(model, second):.1f} | {p50(fp32, second) / p50(model, second):.2f} "
        )

    def quality(model: Variant) -> str:
        if not model.quality:
            return (
                "| - | - "
                if model.label != "fp32"
                else ("| 1 | 1 " if encoder else f"| 1 | {fp32_ppl:.2f} ")
            )
        q = model.quality
        if encoder:
            return f"| {q['cosine_mean']:.4f} | {q['cosine_min']:.4f} "
        return (
            f"| {q['top1']:.4f} | {q['ppl_fp32']:.2f} -> {q['ppl']:.2f} "
            f"({q['ppl_increase_pct']:+.1f} %) "
        )

    fp32_ppl = next((m.quality["ppl_fp32"] for m in models if "ppl_fp32" in m.quality), 0.0)
    lines.append(
        f"| fp32 | reference: convert (kept by the jobs) | {fp32.size_mb:.1f} | 1.00 "
        f"{timing(fp32)}{quality(fp32)}| - | - |"
    )
    for job in jobs:
        name = f"{job.device_class} / {job.recipe}"
        if job.result is None or job.variant is None:
            lines.append(f"| - | {name} | failed: {job.error} |")
            continue
        model = job.variant
        if model.error:
            lines.append(f"| {model.label} | {name} / {job.change()} | {model.size_mb:.1f} "
                         f"| failed: {model.error} |")  # fmt: skip
            continue
        met = f"{'yes' if job.floor_met else 'no'} / "
        met += "yes" if held_out_ok(case.task, model, job.profile) else "no"
        pick = "**yes**" if chosen.get(job.device_class) is job else ""
        lines.append(
            f"| {model.label} | {name} / {job.change()} | {model.size_mb:.1f} "
            f"| {fp32.size_mb / model.size_mb:.2f} {timing(model)}{quality(model)}"
            f"| {met} | {pick} |"
        )
    lines.append("")
    for name, pick_job in chosen.items():
        profile = next(j.profile for j in jobs if j.device_class == name)
        if pick_job is None or pick_job.variant is None:
            lines.append(f"- {name} ({profile.objective}): search chose: none meets the floor")
            continue
        q = pick_job.variant.quality
        what = (
            f"cosine {q['cosine_mean']:.4f}"
            if encoder
            else f"top-1 {q['top1']:.4f}, perplexity {q['ppl_increase_pct']:+.1f} %"
        )
        lines.append(
            f"- {name} ({profile.objective}): search chose: {pick_job.recipe} ({what}, "
            f"{pick_job.variant.size_mb:.1f} MB, p50 {p50(pick_job.variant):.1f} ms)"
        )
    lines.append(targets(case, fp32, [m for m in models if m.label != "fp32"]))
    lines.append("")
    lines.append("Search trails (quick score on the optimizer's own samples):")
    for job in jobs:
        if job.result is None:
            continue
        tries = "; ".join(
            f"{e.attempt}. {e.change}: {e.quality_metric} {e.quality:.4f} (floor "
            f"{e.floor if e.floor is not None else '-'}), {e.size_mb:.1f} MB"
            f"{', met' if e.meets_floor else ''}"
            for e in job.result.trail
        )
        lines.append(
            f"- {job.device_class} / {job.recipe} ({job.result.duration_s:.0f} s): {tries}"
        )
    lines.append("Time: " + ", ".join(f"{label} {seconds:.0f} s" for label, seconds in timings))
    return lines


def targets(case: Case, fp32: Variant, variants: list[Variant]) -> str:
    weights_mb = sum(p.stat().st_size for p in case.path.glob("*.safetensors")) / MB
    measured = [v for v in variants if v.quality and v.latency]
    if case.task == "text-generation":

        def checks(v: Variant) -> list[tuple[str, bool]]:
            ratio = p50(v) / p50(fp32)
            return [
                (f"{v.size_mb:.1f} MB <= {SMOL_MAX_MB:g}", v.size_mb <= SMOL_MAX_MB),
                (f"top-1 {v.quality['top1']:.4f} >= {SMOL_MIN_TOP1}",
                 v.quality["top1"] >= SMOL_MIN_TOP1),
                (f"p50 {ratio:.2f} x fp32 <= {SMOL_MAX_P50_RATIO}", ratio <= SMOL_MAX_P50_RATIO),
            ]  # fmt: skip
    else:

        def checks(v: Variant) -> list[tuple[str, bool]]:
            smaller, faster = fp32.size_mb / v.size_mb, p50(fp32) / p50(v)
            also = f" (vs the source's model.safetensors: {weights_mb / v.size_mb:.2f}x)"
            return [
                (f"{smaller:.2f}x smaller than fp32 ONNX{also if weights_mb else ''} >= "
                 f"{MINI_MIN_SMALLER}", smaller >= MINI_MIN_SMALLER),
                (f"{faster:.2f}x faster >= {MINI_MIN_FASTER}", faster >= MINI_MIN_FASTER),
                (f"cosine {v.quality['cosine_mean']:.4f} >= {MINI_MIN_COSINE}",
                 v.quality["cosine_mean"] >= MINI_MIN_COSINE),
            ]  # fmt: skip

    if not measured:
        return "- targets: MISS (no variant measured)"
    best = max(measured, key=lambda v: (sum(ok for _, ok in checks(v)), -v.size_mb))
    parts = ", ".join(f"{text} {'PASS' if ok else 'MISS'}" for text, ok in checks(best))
    verdict = "PASS" if all(ok for _, ok in checks(best)) else "MISS"
    return f"- targets ({best.label}, the variant meeting most of them): {parts} => {verdict}"
