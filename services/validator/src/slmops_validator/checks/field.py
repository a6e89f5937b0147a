"""Field: a re-optimization candidate judged against the figure the field broke.

The gateways measured the regressed variant on the class's own devices (``FieldEvidence``).
This host cannot stand for those devices, but it can say how the candidate compares with the
regressed variant: both run side by side here in the probe child with the latency harness
(interleaved pairs, warm-up, more rounds while the ratio is within noise of what the budget
needs), and the field's figure is scaled by that ratio r, candidate / regressed:
``predicted = field value x r``. The gate ``field.<metric>`` judges the prediction against the
class budget the field broke: a candidate whose prediction misses fails, whatever its host gates
say. Per metric (``slmops.telemetry.budgets.FIELD_METRICS``):

- ``latency_p95_ms``: r of the p95 latency (a decoder: of the whole request of the class's load);
- ``ttft_p95_ms``: r of the time to first token;
- ``decode_tokens_per_s``: r of the decode rate (the inverse of the time per token), a floor;
- ``peak_memory_mb``: r of the peak RSS growth each shows loaded and running in a process of
  its own (the runtime check's measurement); of the artifact sizes when the host saw no growth.

A p95 ratio needs pairs: with fewer than 20 (a decoder's few generations) the median's ratio
stands for it, and the detail says so. A host of another architecture than the class gives a
proxy ratio (other kernels), also said in the detail.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from slmops.events.payloads import FieldEvidence, GateResult
from slmops.profiles import DeviceProfile
from slmops.reports import CheckOutcome
from slmops.telemetry.budgets import METRICS_BY_NAME
from slmops_validator.checks.base import judged, verdict_gate
from slmops_validator.checks.host import host_stands_for
from slmops_validator.checks.noise import RatioEstimate, paired_ratio
from slmops_validator.checks.runtime import run_probe
from slmops_validator.evalinputs import EvalInputs
from slmops_validator.genprobe import request_ms
from slmops_validator.settings import ValidatorSettings

MIN_PAIRS_FOR_P95 = 20
TIMED_METRICS = ("latency_p95_ms", "ttft_p95_ms", "decode_tokens_per_s")


def field_gate(evidence: FieldEvidence, ratio: RatioEstimate, what: str) -> GateResult:
    """The prediction ``field value x ratio`` judged against the field's budget and bound."""
    metric = METRICS_BY_NAME.get(evidence.metric)
    unit = metric.unit if metric else ""
    predicted = evidence.field_value * ratio.ratio
    spaced = f" {unit}" if unit else ""
    detail = (
        f"field {evidence.field_value:.4g}{spaced} x host ratio {ratio.ratio:.3f} = predicted "
        f"{predicted:.4g}{spaced}; r = {what}, candidate / regressed variant "
        f"{evidence.variant_id} (95% CI {ratio.low:.3f}-{ratio.high:.3f}, {ratio.pairs} "
        "pairs on this host)"
    )
    return judged(f"field.{evidence.metric}", predicted, evidence.budget, bound=evidence.bound,
                  unit=unit, detail=detail)  # fmt: skip


def timed_ratio(metric: str, raw: dict[str, Any]) -> tuple[RatioEstimate, str]:
    """r for a timed metric from the field probe's figures (the regressed variant in the
    reference's place). ValueError when the probe measured nothing for it."""
    latency, speed = raw.get("latency"), raw.get("speed")
    if latency is not None and metric == "latency_p95_ms":
        return _quantile_ratio(latency["candidate_ms"], latency["reference_ms"], "p95 latency")
    if speed is None:
        kind = "an encoder-style model" if latency is not None else "the probe"
        raise ValueError(f"{kind} measured no {metric} here")
    if metric == "latency_p95_ms":
        new = speed["new_tokens"]
        candidate = request_ms(speed, "candidate", new)
        return _quantile_ratio(candidate, request_ms(speed, "reference", new), "request latency")
    if metric == "ttft_p95_ms":
        return _quantile_ratio(
            speed["candidate_ttft_ms"], speed["reference_ttft_ms"], "time to first token"
        )
    if metric == "decode_tokens_per_s":  # tokens/s = 1000 / time per token: the inverse
        tpot = speed["reference_tpot_ms"], speed["candidate_tpot_ms"]
        return paired_ratio(*tpot, quantile=0.5), "median decode tokens/s"
    raise ValueError(f"{metric} is not a timed figure")


def _quantile_ratio(
    candidate: list[float], regressed: list[float], what: str
) -> tuple[RatioEstimate, str]:
    if len(candidate) >= MIN_PAIRS_FOR_P95:
        return paired_ratio(candidate, regressed, quantile=0.95), f"{what} p95"
    estimate = paired_ratio(candidate, regressed, quantile=0.5)
    return estimate, f"{what} median (too few pairs for a p95)"


def memory_ratio(
    candidate_mb: float, regressed_mb: float, candidate_bytes: int, regressed_bytes: int
) -> tuple[RatioEstimate, str]:
    """r of peak RSS growth; of artifact sizes when the regressed variant showed none."""
    if regressed_mb > 0:
        r = candidate_mb / regressed_mb
        return RatioEstimate(r, r, r, 1), (
            f"peak RSS growth loaded and running ({candidate_mb:.1f} / {regressed_mb:.1f} MB, "
            "each in a process of its own)"
        )
    r = candidate_bytes / max(regressed_bytes, 1)
    return RatioEstimate(r, r, r, 1), "artifact size (this host measured no RSS growth)"


async def field_check(
    evidence: FieldEvidence,
    candidate: Path,
    regressed: Path | None,
    inputs: EvalInputs,
    profile: DeviceProfile,
    settings: ValidatorSettings,
    *,
    candidate_peak_mb: float | None,
    problem: str = "",
) -> CheckOutcome:
    """The ``field`` check: the candidate and the regressed variant measured here, the field's
    figure scaled by their ratio. ``problem``: why the regressed variant is not at hand."""
    started = time.monotonic()
    outcome = CheckOutcome(name="field")
    name = f"field.{evidence.metric}"
    outcome.evidence = {"regressed_variant": evidence.variant_id, "detection_id":
                        evidence.detection_id, "field_value": evidence.field_value,
                        "field_budget": evidence.budget}  # fmt: skip
    proxy = host_stands_for(profile)
    if proxy:
        outcome.notes.append(f"the host ratio is a proxy for {profile.name}: {proxy}")
    try:
        if regressed is None:
            raise ValueError(problem or "the regressed variant is not at hand")
        if evidence.metric in TIMED_METRICS:
            ratio, what = await _timed(evidence, candidate, regressed, inputs, profile, settings)
        elif evidence.metric == "peak_memory_mb" and candidate_peak_mb is not None:
            raw, failure = await run_probe(
                regressed, None, inputs, profile, settings,
                measure_latency=False, ratio_budget=None, agreement=False,
            )  # fmt: skip
            if failure or "peak_memory_mb" not in raw:
                raise ValueError(f"the regressed variant's probe failed: {failure or raw}")
            sizes = candidate.stat().st_size, regressed.stat().st_size
            ratio, what = memory_ratio(candidate_peak_mb, float(raw["peak_memory_mb"]), *sizes)
        else:
            raise ValueError(f"the field's {evidence.metric!r} cannot be predicted here")
    except ValueError as exc:
        # not judged against the field is not judged: the candidate cannot be proposed
        outcome.gates.append(verdict_gate(name, False, value=0, detail=f"not predicted: {exc}"))
        outcome.duration_s = time.monotonic() - started
        return outcome
    gate = field_gate(evidence, ratio, what)
    outcome.gates.append(gate)
    outcome.evidence.update(host_ratio=round(ratio.ratio, 4), ratio_low=round(ratio.low, 4),
                            ratio_high=round(ratio.high, 4), pairs=ratio.pairs,
                            predicted=round(gate.value or 0.0, 4), measured_as=what)  # fmt: skip
    outcome.duration_s = time.monotonic() - started
    return outcome


async def _timed(
    evidence: FieldEvidence,
    candidate: Path,
    regressed: Path,
    inputs: EvalInputs,
    profile: DeviceProfile,
    settings: ValidatorSettings,
) -> tuple[RatioEstimate, str]:
    # more rounds while the ratio straddles the one the budget needs (p95 latency only: the
    # probe's rounds follow a p95 for encoders and the whole request for decoders)
    needed = None
    if evidence.metric == "latency_p95_ms" and evidence.field_value > 0:
        needed = evidence.budget / evidence.field_value
    raw, failure = await run_probe(
        candidate, regressed, inputs, profile, settings,
        measure_latency=True, ratio_budget=needed, agreement=False,
    )  # fmt: skip
    if failure or raw.get("load_error") or raw.get("run_error"):
        why = failure or raw.get("load_error") or raw.get("run_error")
        raise ValueError(f"the side-by-side probe failed: {why}")
    return timed_ratio(evidence.metric, raw)
