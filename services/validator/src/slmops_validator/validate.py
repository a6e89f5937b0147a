"""One validation, start to finish: a variant judged against its class, with the evidence.

structure (in-process, no runtime) → evaluation inputs → the probe (load, smoke, memory and
latency in a child process) → parity (in a thread, against the fp32 reference) → size; and for
a re-optimization candidate, the field check (``checks.field``: the field's figure scaled by the
host ratio against the regressed variant). Every figure becomes a gate; the verdict fails if
any gate fails, and says which, with the value and the budget. The report also carries the
candidate's drift baseline, from runs made anyway: an encoder's pooled embeddings of the
evaluation texts (parity), a decoder's log-probabilities of its greedy tokens (the probe's
agreement run). Nothing here publishes: the handler stores the report and emits the event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from slmops.evaldata import (
    DEFAULT_EVAL_SET_NAME,
    EvalRecord,
    EvalSetError,
    default_records,
    parse_eval_jsonl,
)
from slmops.events.payloads import ArtifactRef, GateResult, OptimizationCompleted
from slmops.objectstore import blob_key
from slmops.profiles import DeviceProfile
from slmops.reports import CheckOutcome, ValidationReport, describe_value
from slmops.telemetry.drift import DriftSignature
from slmops_validator.checks.base import judged, not_measurable, verdict_gate
from slmops_validator.checks.field import field_check
from slmops_validator.checks.host import host_summary
from slmops_validator.checks.parity import parity_check
from slmops_validator.checks.runtime import ProbeResult, probe
from slmops_validator.checks.structure import StructureCheck
from slmops_validator.evalinputs import EvalInputs, build_inputs
from slmops_validator.models import ModelCache
from slmops_validator.settings import ValidatorSettings


@dataclass(frozen=True)
class Subject:
    """What is judged: the optimizer's outcome, plus what the model version says."""

    completed: OptimizationCompleted
    task: str
    eval_set: ArtifactRef | None
    # a re-optimization: the regressed variant's artifact (signed), or why it is not at hand
    regressed: ArtifactRef | None = None
    regressed_problem: str = ""


async def validate(
    subject: Subject, profile: DeviceProfile, cache: ModelCache, settings: ValidatorSettings
) -> ValidationReport:
    started_at, started = datetime.now(UTC), time.monotonic()
    done = subject.completed
    checks: list[CheckOutcome] = []
    candidate = await cache.fetch(done.artifact)
    structure, proto = await asyncio.to_thread(StructureCheck().run, candidate, profile)
    checks.append(structure)
    inputs: EvalInputs | None = None
    metadata: dict[str, str] = {}
    if proto is not None:
        metadata = {p.key: p.value for p in proto.metadata_props}
        vocab = _vocab_size(proto)
        del proto  # the graph's weights: not needed past this point
        records, problem = await _records(subject.eval_set, cache)
        if problem:
            checks.append(
                CheckOutcome(
                    name="evaluation_set",
                    gates=[verdict_gate("eval_set.valid", False, value=1, detail=problem)],
                )
            )
        else:
            inputs = await asyncio.to_thread(
                build_inputs,
                metadata,
                subject.task,
                records,
                settings,
                set_name=subject.eval_set.digest if subject.eval_set else DEFAULT_EVAL_SET_NAME,
                set_digest=subject.eval_set.digest if subject.eval_set else None,
                vocab_size=vocab,
            )
    baseline: DriftSignature | None = None
    probed: ProbeResult | None = None
    if inputs is not None:
        reference = await cache.fetch(done.reference) if done.reference else None
        probed = await probe(candidate, reference, inputs, profile, settings)
        checks += [probed.runtime, probed.latency]
        baseline = probed.drift
        if probed.loaded and reference is not None:
            parity, embedded = await asyncio.to_thread(
                parity_check, candidate, reference, inputs, profile, settings.threads, metadata
            )
            baseline = baseline or embedded
            if inputs.info.truncated:
                parity.notes.append(
                    f"{inputs.info.truncated} of {inputs.info.examples} texts were longer than "
                    f"{inputs.info.max_tokens} tokens and were truncated to it"
                )
            checks.append(parity)
        elif reference is None:
            checks.append(
                CheckOutcome(
                    name="parity",
                    gates=[
                        verdict_gate(
                            "parity.reference",
                            False,
                            value=0,
                            detail="no fp32 reference to judge "
                            "against (the optimizer stores one with each variant)",
                        )
                    ],
                )
            )
    if done.field is not None:
        if inputs is not None and probed is not None and probed.loaded:
            regressed = await cache.fetch(subject.regressed) if subject.regressed else None
            checks.append(
                await field_check(
                    done.field, candidate, regressed, inputs, profile, settings,
                    candidate_peak_mb=probed.peak_memory_mb, problem=subject.regressed_problem,
                )
            )  # fmt: skip
        else:
            detail = "not predicted: the candidate did not load and run"
            gate = not_measurable(f"field.{done.field.metric}", unit="", detail=detail)
            checks.append(CheckOutcome(name="field", gates=[gate]))
    checks.append(_size(done, profile))
    gates = [g for c in checks for g in c.gates]
    failed = [g for g in gates if g.passed is False]
    return ValidationReport(
        model_name=done.model_name,
        version=done.version,
        variant_id=done.variant_id,
        device_class=done.device_class,
        recipe_name=done.recipe.name,
        verdict="failed" if failed else "passed",
        reason=_reason(failed),
        candidate=done.artifact,
        reference=done.reference,
        eval_set=inputs.info if inputs else None,
        checks=checks,
        host=host_summary(settings.threads),
        started_at=started_at,
        duration_s=time.monotonic() - started,
        drift_baseline=baseline,
    )


def _reason(failed: list[GateResult]) -> str:
    """Every failed gate in words; a field prediction with its arithmetic (field x ratio)."""
    said = []
    for gate in failed:
        text = f"{gate.name} {describe_value(gate)}"
        if gate.name.startswith("field.") and gate.budget is not None:
            text += f" ({gate.detail})"
        said.append(text)
    return "; ".join(said)


async def _records(eval_set: ArtifactRef | None, cache: ModelCache) -> tuple[list[EvalRecord], str]:
    if eval_set is None:
        return default_records(), ""
    raw = await asyncio.to_thread(cache.store.get_bytes, blob_key(eval_set.digest))
    try:
        return parse_eval_jsonl(raw), ""
    except EvalSetError as exc:
        return [], f"the evaluation set {eval_set.digest} is unusable: {exc}"


def _size(done: OptimizationCompleted, profile: DeviceProfile) -> CheckOutcome:
    size_mb = done.artifact.size_bytes / 1e6
    gate = judged(
        "size.size_mb",
        size_mb,
        profile.budgets.max_size_mb,
        bound="max",
        unit="MB",
        detail=f"the class holds models up to {profile.budgets.max_size_mb:g} MB",
    )
    evidence: dict[str, Any] = {"size_mb": round(size_mb, 3)}
    if done.reference is not None and done.artifact.size_bytes:
        evidence["fp32_size_mb"] = round(done.reference.size_bytes / 1e6, 3)
        evidence["smaller_than_fp32_x"] = round(
            done.reference.size_bytes / done.artifact.size_bytes, 3
        )
    return CheckOutcome(name="size", gates=[gate], evidence=evidence)


def _vocab_size(proto: Any) -> int:
    """Rows of the embedding table a Gather on input_ids reads (for random token ids)."""
    dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and node.input[0] in dims and node.input[1] == "input_ids":
            return int(dims[node.input[0]][0])
    return 1000
