"""telemetry HTTP API: the fleet's field figures per variant and class, their gates, and the
findings published. Every route wants a token with the read scope.

Health, readiness, /metrics and /v1/runtime come from the SDK for every service.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from slmops.events.payloads import GateResult, ModelName, Version
from slmops.service.auth import Reader
from slmops_telemetry.view import FieldRow

router = APIRouter(prefix="/v1/fleet", tags=["telemetry"])

Last = Annotated[int, Query(ge=1, le=10_000, description="Windows behind each row's figures.")]
Model = Annotated[ModelName | None, Query(description="Only this model.")]


class DriftScore(BaseModel):
    signal: str = Field(description="embedding or logprobs")
    score: float = Field(description="embedding: standardized mean shift; logprobs: PSI.")
    threshold: float
    field_samples: int
    baseline_samples: int


class ClassHealth(FieldRow):
    """A variant on one class: its field figures, each against the class's budget, and how
    far what it served moved from its validation baseline."""

    gates: list[GateResult] = Field(
        default_factory=list,
        description="Each field figure with a budget for the class: passed, or not.",
    )
    drift: DriftScore | None = Field(
        None, description="null: no baseline, or too few samples served yet."
    )
    expectations_error: str = Field(
        "", description="Why the budgets are missing (the registry did not answer, ...)."
    )


def _field(request: Request) -> Any:
    loop = request.app.state.field
    if not loop.restored:
        raise HTTPException(503, "the fleet view is being restored: see GET /readyz")
    return loop


@router.get(
    "/health",
    response_model=list[FieldRow],
    summary="Field figures per (model, version, variant, class), merged over the gateways",
)
async def health(
    request: Request,
    _: Reader,
    model: Model = None,
    version: Annotated[Version | None, Query(description="Only this version.")] = None,
    last: Last = 10,
) -> list[FieldRow]:
    rows: list[FieldRow] = _field(request).rows(model, version, last)
    return rows


@router.get(
    "/health/{model_name}/{version}",
    response_model=list[ClassHealth],
    summary="One version's field figures per class, judged against the class's budgets",
    responses={404: {"description": "No report of this version folded (in the kept windows)"}},
)
async def version_health(
    request: Request, _: Reader, model_name: ModelName, version: Version, last: Last = 10
) -> list[ClassHealth]:
    loop = _field(request)
    rows: list[ClassHealth] = await loop.health(model_name, version, last)
    if not rows:
        raise HTTPException(
            404, f"no health report of {model_name} {version} in the last "
            f"{loop.settings.keep_windows} windows",
        )  # fmt: skip
    return rows


@router.get(
    "/findings",
    summary="Regressions and drifts published (fleet.regression/drift.detected), newest first",
)
async def findings(request: Request, _: Reader, model: Model = None) -> list[dict[str, Any]]:
    found = [f for f in _field(request).findings.values()
             if model is None or f.get("model_name") == model]  # fmt: skip
    return sorted(found, key=lambda f: (f.get("windows") or [{}])[-1].get("start", ""),
                  reverse=True)  # fmt: skip
