"""Generation: a decoder judged by what a user feels - first token, tokens/s, same text.

The probe's figures (``genprobe``) become gates:

- ``generation.ttft_ms`` (time to first token at the class's prompt length, median) against
  ``budgets.max_ttft_ms``; ``generation.decode_tokens_per_s`` (median of 1000 / time per output
  token) against ``budgets.min_decode_tokens_per_s``; ``generation.tpot_p50_ms`` reported (the
  'fastest' objective ranks by it). Only where the host stands for the class, like latency.
- ``generation.request_ratio``: the whole request of the class's load (first token, then
  ``new_tokens - 1`` more), candidate over fp32 reference, with its bootstrap interval
  (``checks.noise``): it fails only when confidently over ``budgets.max_latency_ratio``.
  ``generation.ttft_ratio`` and ``generation.tpot_ratio`` are reported beside it, not judged:
  an exact 4-bit variant prefills ~10 % slower than fp32 (fp32-activation 4-bit kernels lose to
  the fp32 GEMM at 64 rows) and decodes 1.5x faster, and the user waits for the whole answer;
  the first token alone is judged against the class's absolute ``max_ttft_ms``.
- ``generation.greedy_identical_share``: the share of evaluation prompts whose first N greedy
  tokens equal the fp32 reference's (``quality.min_greedy_identical_share``), and
  ``generation.greedy_identical_tokens_mean``, how far they agree on average (reported).
  Measured on any host: greedy decoding on the CPU is what the class's canary compares too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slmops.events.payloads import GateResult
from slmops.profiles import DeviceProfile
from slmops.reports import CheckOutcome
from slmops_validator.checks.base import judged, not_measurable
from slmops_validator.checks.host import host_stands_for
from slmops_validator.checks.noise import paired_ratio
from slmops_validator.genprobe import request_ms


def generation_outcome(raw: dict[str, Any], profile: DeviceProfile) -> CheckOutcome:
    outcome = CheckOutcome(name="generation")
    outcome.gates += _speed_gates(raw.get("speed"), profile, outcome)
    agreement = raw.get("agreement")
    if agreement:
        identical = agreement["identical_tokens"]
        wanted = agreement["agreement_tokens"]
        share = float(np.mean([n >= wanted for n in identical])) if identical else 0.0
        outcome.gates.append(
            judged(
                "generation.greedy_identical_share",
                share,
                profile.quality.min_greedy_identical_share,
                bound="min",
                detail=f"{sum(n >= wanted for n in identical)} of {len(identical)} prompts: the "
                f"first {wanted} greedy tokens equal the fp32 reference's",
            )
        )
        outcome.gates.append(
            judged(
                "generation.greedy_identical_tokens_mean",
                float(np.mean(identical)) if identical else 0.0,
                None,
                bound="min",
                unit="tokens",
                detail=f"leading greedy tokens shared with the fp32 reference, of {wanted}",
            )
        )
        outcome.evidence["identical_tokens"] = ", ".join(str(n) for n in identical)
    else:
        outcome.notes.append("no fp32 reference: greedy agreement not measured")
    return outcome


def _speed_gates(
    speed: dict[str, Any] | None, profile: DeviceProfile, outcome: CheckOutcome
) -> list[GateResult]:
    budgets = profile.budgets
    why = host_stands_for(profile)
    if speed is None or why:
        detail = f"not measurable on this host: {why or 'no fp32 reference'}; left to the "
        detail += "on-device canary gates"
        outcome.notes.append(detail)
        gates = [
            not_measurable("generation.ttft_ms", unit="ms", detail=detail),
            not_measurable("generation.decode_tokens_per_s", unit="tokens/s", detail=detail),
        ]
        if speed is not None:
            outcome.evidence.update(_evidence(speed))
            outcome.notes.append("the figures below were measured here and not judged")
        return gates
    ttft = float(np.median(speed["candidate_ttft_ms"]))
    tpot = float(np.median(speed["candidate_tpot_ms"]))
    ratio_budget = budgets.max_latency_ratio
    ttft_ratio = paired_ratio(speed["candidate_ttft_ms"], speed["reference_ttft_ms"], quantile=0.5)
    tpot_ratio = paired_ratio(speed["candidate_tpot_ms"], speed["reference_tpot_ms"], quantile=0.5)
    new = speed["new_tokens"]
    request_ratio = paired_ratio(
        request_ms(speed, "candidate", new), request_ms(speed, "reference", new), quantile=0.5
    )
    outcome.evidence.update(_evidence(speed))
    load = f"{speed['prompt_tokens']}-token prompt, {speed['new_tokens']} new tokens, greedy"
    return [
        judged("generation.ttft_ms", ttft, budgets.max_ttft_ms, bound="max", unit="ms",
               detail=f"median time to first token, {load}"),
        judged("generation.decode_tokens_per_s", 1000.0 / tpot, budgets.min_decode_tokens_per_s,
               bound="min", unit="tokens/s", detail="median, after the first token"),
        judged("generation.tpot_p50_ms", tpot, None, bound="max", unit="ms",
               detail=f"fp32 reference {np.median(speed['reference_tpot_ms']):.2f} ms"),
        _ratio_gate("generation.request_ratio", request_ratio, ratio_budget,
                    f"a whole {speed['prompt_tokens']}+{new}-token request"),
        _ratio_gate("generation.ttft_ratio", ttft_ratio, None, "time to first token"),
        _ratio_gate("generation.tpot_ratio", tpot_ratio, None, "time per output token"),
    ]  # fmt: skip


def _ratio_gate(name: str, estimate: Any, budget: float | None, what: str) -> GateResult:
    detail = f"{what}, candidate / fp32 reference: {estimate.describe(budget)}"
    if budget is None:
        return judged(name, estimate.ratio, None, bound="max", unit="x", detail=detail)
    return GateResult(
        name=name,
        value=estimate.ratio,
        budget=budget,
        unit="x",
        bound="max",
        passed=estimate.verdict(budget) != "confident fail",
        detail=detail,
    )


def _evidence(speed: dict[str, Any]) -> dict[str, Any]:
    evidence: dict[str, Any] = {"rounds": speed["rounds"], "pairs": len(speed["candidate_ttft_ms"])}
    for key in ("candidate_ttft_ms", "reference_ttft_ms", "candidate_tpot_ms", "reference_tpot_ms"):
        evidence[f"{key.removesuffix('_ms')}_p50_ms"] = round(float(np.median(speed[key])), 3)
    return evidence
