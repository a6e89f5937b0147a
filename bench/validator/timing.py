"""Time ``validate()`` per variant, split into its checks, and tabulate the key gates."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.optimizer.common import Job
from bench.validator.tables import render
from bench.validator.variants import completed
from slmops.events.payloads import GateResult
from slmops.objectstore import ObjectStore
from slmops.reports import ValidationReport
from slmops_validator.models import ModelCache
from slmops_validator.settings import ValidatorSettings
from slmops_validator.validate import Subject, validate


@dataclass
class Timed:
    job: Job
    report: ValidationReport | None
    wall_s: float
    error: str = ""

    def check_s(self, *names: str) -> float:
        checks = self.report.checks if self.report else []
        return sum(c.duration_s for c in checks if c.name in names)

    def gate(self, name: str) -> GateResult | None:
        gates = self.report.gates if self.report else []
        return next((g for g in gates if g.name == name), None)


async def validate_all(
    jobs: list[Job], store: ObjectStore, settings: ValidatorSettings
) -> list[Timed]:
    """Validate every finished job, one at a time (as one service slot would), timed."""
    cache = ModelCache(settings.scratch_dir / "models", store, settings.cache_max_mb)
    timed: list[Timed] = []
    for job in jobs:
        if job.result is None:
            continue
        subject = Subject(completed(job, store.bucket), job.spec.task, None)
        start = time.monotonic()
        try:
            report = await validate(subject, job.profile, cache, settings)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            timed.append(
                Timed(job, None, time.monotonic() - start, f"{type(exc).__name__}: {first}")
            )
            print(f"  {job.device_class} / {job.recipe}: validate() raised {timed[-1].error}",
                  flush=True)  # fmt: skip
            continue
        timed.append(Timed(job, report, time.monotonic() - start))
        print(
            f"  {job.device_class} / {job.recipe}: {report.verdict} in {timed[-1].wall_s:.1f} s",
            flush=True,
        )
    return timed


def _num(gate: GateResult | None, fmt: str) -> str:
    if gate is None:
        return "-"
    return "n/a" if gate.value is None else format(gate.value, fmt)


def _quality(t: Timed) -> str:
    if t.job.spec.task == "text-generation":
        top1, ppl = t.gate("parity.top1_agreement"), t.gate("parity.perplexity_increase_pct")
        return f"top1 {_num(top1, '.4f')}, ppl {_num(ppl, '+.2f')}%"
    return f"cosine_mean {_num(t.gate('parity.cosine_mean'), '.4f')}"


def _latency(t: Timed) -> str:
    evidence = next((c.evidence for c in (t.report.checks if t.report else [])
                     if c.name == "latency"), {})  # fmt: skip
    if "candidate_p50_ms" not in evidence:
        return "not measurable here"
    cand, ref = float(evidence["candidate_p50_ms"]), float(evidence["reference_p50_ms"])  # type: ignore[arg-type]
    return f"{cand:.1f} / {ref:.1f} ms ({cand / max(ref, 1e-9):.2f}x)"


def table(timed: list[Timed]) -> list[str]:
    headers = [
        "model", "class", "recipe", "verdict", "parity", "p50 cand / fp32 (ratio)",
        "peak MB", "size MB", "struct s", "probe s", "parity s", "other s", "total s",
    ]  # fmt: skip
    rows = []
    for t in timed:
        job = t.job
        if t.report is None:
            rows.append([job.spec.model_name, job.device_class, job.recipe, "ERROR", t.error]
                        + [""] * 7 + [f"{t.wall_s:.1f}"])  # fmt: skip
            continue
        known = t.check_s("structure", "runtime", "latency", "parity")
        rows.append([
            job.spec.model_name, job.device_class, job.recipe, t.report.verdict, _quality(t),
            _latency(t), _num(t.gate("runtime.peak_memory_mb"), ".0f"),
            _num(t.gate("size.size_mb"), ".1f"), f"{t.check_s('structure'):.1f}",
            f"{t.check_s('runtime', 'latency'):.1f}", f"{t.check_s('parity'):.1f}",
            f"{max(0.0, t.wall_s - known):.1f}", f"{t.wall_s:.1f}",
        ])  # fmt: skip
    lines = render(headers, rows)
    for t in timed:
        if t.report is not None and t.report.reason:
            lines.append(f"  {t.job.device_class} / {t.job.recipe} failed: {t.report.reason}")
    return lines


def throughput(timed: list[Timed]) -> list[str]:
    """Validations per hour per model, from the mean measured wall time (one at a time)."""
    lines = []
    for model in dict.fromkeys(t.job.spec.model_name for t in timed):
        walls = [t.wall_s for t in timed if t.job.spec.model_name == model and t.report]
        if not walls:
            lines.append(f"{model}: no validation finished")
            continue
        mean = sum(walls) / len(walls)
        lines.append(
            f"{model}: {len(walls)} validation(s), mean {mean:.1f} s each -> "
            f"{3600.0 / mean:.0f} validations/hour, one at a time"
        )
    return lines
