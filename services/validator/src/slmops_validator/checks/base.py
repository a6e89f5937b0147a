"""What every check shares: how a figure becomes a judged gate.

A check is a small class with a declarative config; it returns a
:class:`~slmops.reports.CheckOutcome` whose gates carry the measured value, the budget, the
bound (``max``: may not exceed; ``min``: may not fall below) and pass/fail. A figure this host
cannot stand for is a gate with no value and ``passed=None``: reported, never faked.
"""

from __future__ import annotations

import math
from typing import Literal

from slmops.events.payloads import GateResult


def judged(
    name: str,
    value: float,
    budget: float | None,
    *,
    bound: Literal["max", "min"],
    unit: str = "",
    detail: str = "",
) -> GateResult:
    """A measured figure against its budget (no budget: reported, not judged)."""
    if budget is None:
        return GateResult(
            name=name,
            value=value,
            unit=unit,
            bound=bound,
            detail=detail or "no budget for this class",
        )
    passed = False if math.isnan(value) else value <= budget if bound == "max" else value >= budget
    return GateResult(
        name=name, value=value, budget=budget, unit=unit, bound=bound, passed=passed, detail=detail
    )


def verdict_gate(name: str, ok: bool, *, value: float, detail: str, unit: str = "") -> GateResult:
    """A yes/no requirement (the model loads, the opset is in range) with its figure."""
    return GateResult(name=name, value=value, unit=unit, passed=ok, detail=detail)


def not_measurable(name: str, *, unit: str, detail: str) -> GateResult:
    return GateResult(name=name, value=None, unit=unit, passed=None, detail=detail)
