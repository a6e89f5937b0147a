"""Which field figure is judged against which budget of a device class, and which gate of a
validation report holds the host's figure for it: one table the telemetry service (field
gates, regressions), the optimizer (ranking candidates) and the validator (judging them
against the field) share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slmops.events.payloads import FieldFigures
from slmops.profiles import Budgets


@dataclass(frozen=True)
class FieldMetric:
    name: str  # the attribute of FieldFigures (and the metric of a regression)
    budget: str  # the attribute of the class's Budgets
    bound: Literal["max", "min"]
    host_gate: str | None  # the validation report's gate measuring it on the host
    unit: str

    def budget_of(self, budgets: Budgets) -> float | None:
        value = getattr(budgets, self.budget)
        return None if value is None else float(value)

    def value_of(self, figures: FieldFigures) -> float | None:
        value = getattr(figures, self.name)
        return None if value is None else float(value)

    def breaks(self, value: float, budget: float) -> bool:
        return value > budget if self.bound == "max" else value < budget


FIELD_METRICS: tuple[FieldMetric, ...] = (
    FieldMetric("latency_p95_ms", "max_latency_p95_ms", "max", "latency.p95_ms", "ms"),
    FieldMetric("ttft_p95_ms", "max_ttft_ms", "max", "generation.ttft_ms", "ms"),
    FieldMetric(
        "decode_tokens_per_s",
        "min_decode_tokens_per_s",
        "min",
        "generation.decode_tokens_per_s",
        "tokens/s",
    ),
    FieldMetric("peak_memory_mb", "max_peak_memory_mb", "max", None, "MB"),
)
METRICS_BY_NAME = {m.name: m for m in FIELD_METRICS}
