"""Runtime: the model loads and runs in ONNX Runtime; its memory and latency on this host.

Measured by the probe (a child process, see ``probe.py``) and judged here. Latency is judged
only for classes whose hardware this host stands for (``latency_measurable_on_host``); for the
others it is reported as not measurable and left to the on-device canary gates. Memory is
judged for CPU classes (weights dominate RSS on any CPU); for GPU/NPU classes it is reported.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmops.events.payloads import GateResult
from slmops.jobdirs import owned_dir
from slmops.profiles import DeviceProfile
from slmops.reports import CheckOutcome
from slmops.telemetry.drift import DriftSignature, TokenLogprobs
from slmops_validator.checks.base import judged, not_measurable, verdict_gate
from slmops_validator.checks.generation import generation_outcome
from slmops_validator.checks.host import host_stands_for, same_architecture
from slmops_validator.checks.noise import paired_ratio
from slmops_validator.evalinputs import EvalInputs
from slmops_validator.scratch import job_root
from slmops_validator.settings import ValidatorSettings

_HOST_EPS = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class ProbeResult:
    runtime: CheckOutcome
    latency: CheckOutcome
    loaded: bool  # False: parity cannot run
    peak_memory_mb: float | None = None  # RSS growth, as the memory gate holds it
    # decoders: the log-probabilities of the candidate's greedy tokens on the evaluation
    # prompts (the agreement run), the report's drift baseline
    drift: DriftSignature | None = None


def host_providers(profile: DeviceProfile) -> tuple[list[str], str]:
    """The class's EPs this host has (CPU at least), and a note when one is missing."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    usable = [ep for ep in profile.execution_providers if ep in available] or list(_HOST_EPS)
    missing = [ep for ep in profile.execution_providers if ep not in available]
    note = (
        f"{', '.join(missing)} not available on this host: loaded with {', '.join(usable)}"
        if missing
        else ""
    )
    return usable, note


async def probe(
    candidate: Path,
    reference: Path | None,
    inputs: EvalInputs,
    profile: DeviceProfile,
    settings: ValidatorSettings,
) -> ProbeResult:
    started = time.monotonic()
    providers, provider_note = host_providers(profile)
    # Measured on a host of the class's architecture even when it lacks an ISA feature: the
    # figures are kept as evidence, only not judged.
    measure_latency = (
        profile.latency_measurable_on_host and same_architecture(profile) and reference is not None
    )
    raw, failure = await run_probe(
        candidate, reference, inputs, profile, settings,
        measure_latency=measure_latency, ratio_budget=profile.budgets.max_latency_ratio,
    )  # fmt: skip
    runtime = CheckOutcome(name="runtime", notes=[provider_note] if provider_note else [])
    latency = CheckOutcome(name="latency")
    if failure or raw.get("load_error") or raw.get("run_error"):
        why = failure or raw.get("load_error") or raw.get("run_error")
        stage = "load" if failure or raw.get("load_error") else "run"
        runtime.gates.append(verdict_gate(f"runtime.{stage}", False, value=1, detail=str(why)))
        runtime.duration_s = time.monotonic() - started
        return ProbeResult(runtime, latency, loaded=False)
    runtime.gates.append(
        verdict_gate("runtime.load", True, value=0, detail=f"ONNX Runtime {raw['ort_version']}")
    )
    non_finite = sum(o["non_finite"] for o in raw["outputs"])
    runtime.gates.append(
        judged(
            "runtime.non_finite_outputs",
            non_finite,
            0,
            bound="max",
            detail="NaN/Inf values on the first evaluation batch",
        )
    )
    runtime.gates.append(
        _memory_gate(raw["peak_memory_mb"], profile, providers, raw.get("memory_context_tokens"))
    )
    runtime.evidence = {
        "outputs": "; ".join(f"{o['name']} {o['shape']}" for o in raw["outputs"]),
        "providers": ", ".join(providers),
    }
    runtime.duration_s = time.monotonic() - started
    peak = float(raw["peak_memory_mb"])
    if inputs.generation is not None:
        generation = generation_outcome(raw, profile)
        generation.duration_s = time.monotonic() - started
        logprobs = (raw.get("agreement") or {}).get("logprobs")
        drift = None
        if logprobs:  # the agreement run's tokens (needs the reference)
            drift = DriftSignature(logprobs=TokenLogprobs.model_validate(logprobs))
        return ProbeResult(runtime, generation, loaded=True, peak_memory_mb=peak, drift=drift)
    latency.gates, latency.evidence, latency.notes = _latency(
        raw.get("latency"), profile, reference is not None
    )
    return ProbeResult(runtime, latency, loaded=True, peak_memory_mb=peak)


async def run_probe(
    candidate: Path,
    baseline: Path | None,
    inputs: EvalInputs,
    profile: DeviceProfile,
    settings: ValidatorSettings,
    *,
    measure_latency: bool,
    ratio_budget: float | None,
    agreement: bool = True,
) -> tuple[dict[str, Any], str]:
    """The probe child's figures for ``candidate`` (timed against ``baseline``: the fp32
    reference, or a re-optimization's regressed variant), or why it produced none.
    ``agreement``: decoders, compare greedy tokens with the baseline too."""
    providers, _ = host_providers(profile)
    with owned_dir(job_root(settings), "probe") as folder:
        np.savez(folder / "smoke.npz", allow_pickle=False, **inputs.feeds[0])
        np.savez(folder / "latency.npz", allow_pickle=False, **inputs.latency_feed)
        generation = _generation_load(inputs, profile, settings)
        if generation is not None:
            generation["agreement"] = agreement
        spec = {
            "candidate": str(candidate),
            "reference": str(baseline) if baseline else None,
            "smoke_feed": str(folder / "smoke.npz"),
            "latency_feed": str(folder / "latency.npz"),
            "threads": settings.threads,
            "providers": providers,
            "measure_latency": measure_latency,
            "warmup_runs": settings.latency_warmup_runs,
            "runs": settings.latency_runs,
            "ratio_budget": ratio_budget,
            "max_rounds": settings.latency_max_rounds,
            "lock_path": str(settings.scratch_dir / "latency.lock"),
            "scratch": str(folder),
            "generation": generation,
        }
        (folder / "spec.json").write_text(json.dumps(spec))
        return await _run_child(folder / "spec.json", settings.probe_timeout_s)


def _generation_load(
    inputs: EvalInputs, profile: DeviceProfile, settings: ValidatorSettings
) -> dict[str, Any] | None:
    """What the probe generates with: the class's request shape and the evaluation prompts."""
    if inputs.generation is None:
        return None
    load = profile.generation
    stream = [t for ids in inputs.prompts for t in ids]
    speed_prompt = (stream * (load.prompt_tokens // max(1, len(stream)) + 1))[: load.prompt_tokens]
    prompts = [ids[: load.prompt_tokens] for ids in inputs.prompts[: load.agreement_prompts]]
    return {
        "speed_prompt": speed_prompt,
        "prompts": prompts,
        "new_tokens": load.new_tokens,
        "context_tokens": load.context_tokens,
        "agreement_tokens": load.agreement_tokens,
        "runs": settings.generation_runs,
        "max_rounds": settings.latency_max_rounds,
    }


async def _run_child(spec: Path, timeout_s: float) -> tuple[dict[str, Any], str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "slmops_validator.probe",
        str(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return {}, f"the probe ran longer than {timeout_s:g} s (SLMOPS_VALIDATOR_PROBE_TIMEOUT_S)"
    code = process.returncode or 0
    if code < 0:
        name = signal.Signals(-code).name
        return {}, f"ONNX Runtime crashed the process ({name}) loading or running the model"
    if code != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {}, f"the probe failed (exit {code}): {tail[0][:400]}"
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]), ""


def _memory_gate(
    peak_mb: float, profile: DeviceProfile, providers: list[str], context: int | None
) -> GateResult:
    budget = profile.budgets.max_peak_memory_mb
    what = "RSS growth while loaded and running"
    if context is not None:
        what += f", generating with a {context}-token context (KV cache included)"
    if all(ep in _HOST_EPS for ep in profile.execution_providers):
        return judged(
            "runtime.peak_memory_mb", peak_mb, budget, bound="max", unit="MB", detail=what
        )
    return GateResult(
        name="runtime.peak_memory_mb",
        value=peak_mb,
        budget=budget,
        unit="MB",
        bound="max",
        passed=None,
        detail=f"RSS with {', '.join(providers)} on this host; the device's own "
        "execution provider is judged by the on-device canary",
    )


def _latency(
    stats: dict[str, Any] | None, profile: DeviceProfile, has_reference: bool
) -> tuple[list[GateResult], dict[str, Any], list[str]]:
    budgets = profile.budgets
    why = host_stands_for(profile)
    if not has_reference:
        why = "no fp32 reference to interleave with"
    evidence = _rounded(stats) if stats else {}
    if why:
        detail = f"not measurable on this host: {why}; left to the on-device canary gates"
        gates = [not_measurable("latency.p95_ms", unit="ms", detail=detail)]
        if budgets.max_latency_ratio is not None:
            gates.append(not_measurable("latency.p95_ratio", unit="x", detail=detail))
        notes = [detail]
        if stats:
            notes.append("the figures below were measured here for information and not judged")
        return gates, evidence, notes
    if stats is None:  # the probe measures whenever the host stands for the class
        raise RuntimeError("the probe returned no latency figures")
    estimate = paired_ratio(stats["candidate_ms"], stats["reference_ms"], quantile=0.95)
    budget = budgets.max_latency_ratio
    ratio_detail = "candidate p95 / fp32 reference p95, interleaved runs: "
    ratio_detail += estimate.describe(budget)
    ratio_gate = judged(
        "latency.p95_ratio", estimate.ratio, budget, bound="max", unit="x", detail=ratio_detail
    )
    if budget is not None:  # fails only when confidently over (checks.noise)
        ratio_gate = ratio_gate.model_copy(
            update={"passed": estimate.verdict(budget) != "confident fail"}
        )
    gates = [
        judged(
            "latency.p50_ms",
            stats["candidate_p50_ms"],
            None,
            bound="max",
            unit="ms",
            detail=f"fp32 reference {stats['reference_p50_ms']:.2f} ms",
        ),
        judged(
            "latency.p95_ms",
            stats["candidate_p95_ms"],
            budgets.max_latency_p95_ms,
            bound="max",
            unit="ms",
            detail=f"batch 1, {stats['tokens']} tokens",
        ),
        ratio_gate,
    ]
    return gates, evidence, []


def _rounded(stats: dict[str, Any]) -> dict[str, Any]:
    evidence = {
        k: round(v, 3) if isinstance(v, float) else v
        for k, v in stats.items()
        if not isinstance(v, list)  # the raw series stay out of the report
    }
    evidence["p50_ratio"] = round(
        stats["candidate_p50_ms"] / max(stats["reference_p50_ms"], 1e-9), 3
    )
    return evidence
