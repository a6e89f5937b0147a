"""validator HTTP API: the verdicts it reached and the release tallies of model versions (and
of re-optimizations, by the release id the optimizer named them with).

Health, readiness and /v1/runtime come from the SDK for every service. Reports themselves are
artifacts of the registry (``GET /v1/variants/{id}/report`` there; ``slmops report``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import nats.js.errors
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam

from slmops.auth import Scope
from slmops.service.auth import require
from slmops_validator.context import ValidatorContext
from slmops_validator.releases import Tally, release_key, tally_key

router = APIRouter(prefix="/v1", tags=["validator"], dependencies=[Depends(require(Scope.READ))])


async def _get(request: Request, key: str, missing: str) -> bytes:
    ctx: ValidatorContext = request.app.state.validator
    kv = await ctx.state()
    if kv is None:
        raise HTTPException(503, "not connected to NATS yet: see GET /readyz")
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        raise HTTPException(404, missing) from None
    return entry.value or b"{}"


@router.get("/validations/{variant_id}", summary="The verdict on one variant, with its gates")
async def get_validation(variant_id: str, request: Request) -> dict[str, Any]:
    raw = await _get(
        request,
        f"validator.variant.{variant_id}",
        f"variant {variant_id} has not been judged (yet)",
    )
    body: dict[str, Any] = json.loads(raw)
    return body


@router.get("/releases/{name}/{version}", summary="A version's tally: planned, judged, released")
async def get_tally(name: str, version: str, request: Request) -> Tally:
    raw = await _get(
        request, tally_key(name, version), f"nothing planned or judged for {name} {version} (yet)"
    )
    return Tally.model_validate_json(raw)


@router.get(
    "/proposals/{release_id}",
    summary="A re-optimization's tally: its field evidence, candidates, decision",
)
async def get_proposal(
    release_id: Annotated[str, PathParam(pattern=r"^rel-field-[0-9a-f]{20}$")], request: Request
) -> Tally:
    raw = await _get(
        request,
        release_key(release_id),
        f"nothing planned or judged for release {release_id} (yet)",
    )
    return Tally.model_validate_json(raw)
