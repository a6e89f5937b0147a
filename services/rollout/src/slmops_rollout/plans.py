"""Waves: which gateways get a release, in what order, in how many steps.

Targets are the registered gateways of the release's device classes that match the label
selector. They are ordered by a hash of (rollout id, gateway id): a stable, spread-out canary
(not always the same first devices, not clustered by name). Wave ``i`` covers the first
``percent_i`` of them (cumulative), at least one gateway more than the wave before.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops.cohorts import LabelOverlay, cohort_of, matches
from slmops.events.payloads import WavePlan

__all__ = ["Overlay", "WavePolicy", "matches", "order", "plan_waves", "wave_plans"]


class WavePolicy(BaseModel):
    """How a rollout advances; every field says its unit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percents: list[float] = Field(
        default_factory=lambda: [1.0, 10.0, 50.0, 100.0],
        min_length=1,
        description="Cumulative share of the targets per wave, in %, rising to 100.",
    )
    success_threshold: float = Field(
        0.95, gt=0, le=1, description="Share of a wave's gateways that must have applied."
    )
    error_threshold: float = Field(
        0.05, ge=0, le=1, description="Share of failed gateways in a wave that pauses the rollout."
    )
    soak_s: float = Field(60.0, ge=0, description="Health gates must hold this long per wave.")
    max_rate_per_min: int = Field(
        100_000, ge=1, description="Most assignments sent per minute (throttles large waves)."
    )
    silent_timeout_s: float = Field(
        300.0, gt=0, description="A gateway silent this long no longer blocks its wave."
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Health gate: inference error rate on the new model."
    )
    max_latency_ratio: float = Field(
        1.5, gt=0, description="Health gate: p95 latency on the new model / before it."
    )
    min_shadow_agreement: float | None = Field(
        None, ge=0, le=1, description="Health gate: agreement with the previous model (shadow)."
    )
    health_min_requests: int = Field(
        5, ge=1, description="Requests a health window needs before its gates are judged."
    )
    rollback_scope: Literal["gateways", "fleet"] = Field(
        "gateways",
        description="What a breached health gate rolls back: the breaching gateways, or every "
        "gateway the rollout reached.",
    )
    approval_waves: list[int] = Field(
        default_factory=list,
        description="Waves that start only once approved (e.g. [1]: someone looks at the "
        "canary first).",
    )

    @model_validator(mode="after")
    def _rising_to_100(self) -> WavePolicy:
        if any(b <= a for a, b in zip(self.percents, self.percents[1:], strict=False)):
            raise ValueError(f"percents must rise wave by wave: {self.percents}")
        if self.percents[-1] != 100 or self.percents[0] <= 0:
            raise ValueError(f"percents must be above 0 and end at 100: {self.percents}")
        outside = [w for w in self.approval_waves if not 0 < w < len(self.percents)]
        if outside:
            raise ValueError(
                f"approval_waves {outside} are not waves after the first: the waves are "
                f"0..{len(self.percents) - 1} and wave 0 starts with the rollout"
            )
        return self


OVERLAY_SETTINGS = ("intra_op_threads", "max_input_tokens")  # what the agent knows


class Overlay(LabelOverlay):
    """Local settings for the gateways whose labels match: one variant, many sites (checked
    against the settings the agent knows)."""

    @model_validator(mode="after")
    def _known_settings(self) -> Overlay:
        unknown = sorted(set(self.settings) - set(OVERLAY_SETTINGS))
        if unknown:
            raise ValueError(f"unknown overlay settings {unknown}: known are {OVERLAY_SETTINGS}")
        low = {k: v for k, v in self.settings.items() if v < 1}
        if low:
            raise ValueError(f"overlay settings must be at least 1: {low}")
        return self


def order(rollout_id: str, gateway_ids: Iterable[str]) -> list[str]:
    """A stable pseudo-random order of the targets, different per rollout, with the gateways
    of one cohort side by side (a wave is a set of whole cohorts)."""

    def rank(cohort: int) -> bytes:
        return hashlib.sha256(f"{rollout_id}\0{cohort}".encode()).digest()

    return sorted(gateway_ids, key=lambda g: (rank(cohort_of(g)), g))


def plan_waves(rollout_id: str, targets: Iterable[str], policy: WavePolicy) -> list[list[str]]:
    """The gateways of each wave (each wave lists only the ones new in it); a wave ends at a
    cohort's end, so one cohort's gateways are never split over two waves."""
    ordered = order(rollout_id, targets)
    cohorts = [cohort_of(g) for g in ordered]
    waves: list[list[str]] = []
    done = 0
    for percent in policy.percents:
        upto = max(done + 1, math.ceil(len(ordered) * percent / 100.0))
        upto = min(upto, len(ordered))
        while 0 < upto < len(ordered) and cohorts[upto] == cohorts[upto - 1]:
            upto += 1
        if upto > done:
            waves.append(ordered[done:upto])
            done = upto
    return waves


def wave_plans(waves: list[list[str]], policy: WavePolicy) -> list[WavePlan]:
    """The waves as ``rollout.started`` announces them."""
    plans, total = [], sum(len(w) for w in waves)
    cumulative = 0
    for index, wave in enumerate(waves):
        cumulative += len(wave)
        percent = 100.0 * cumulative / total if total else 100.0
        plans.append(WavePlan(index=index, percent=percent, target_count=len(wave)))
    return plans
