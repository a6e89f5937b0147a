"""registry HTTP API for variants and their validation reports (``/v1/variants``).

The optimizer stores a variant (its artifact uploaded first through ``POST /v1/blobs``); the
validator stores its report about it the same way; the CLI and people read the newest report.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from slmops.auth import Principal, Scope
from slmops.events.payloads import Token
from slmops.rollbacks import rollback_statement
from slmops.service.auth import require
from slmops_registry.api import Installer, check_readable, validated
from slmops_registry.errors import RegistryError
from slmops_registry.variants import ReportRequest, VariantRequest, Variants

router = APIRouter(prefix="/v1/variants", tags=["registry"])

# What only a service may do is in no person's token (see slmops.auth.principals).
VariantWriter = Annotated[Principal, Depends(require(Scope.VARIANTS_WRITE))]
ReportWriter = Annotated[Principal, Depends(require(Scope.REPORTS_WRITE))]
RollbackSigner = Annotated[Principal, Depends(require(Scope.ROLLBACKS_SIGN))]


async def _variants(request: Request) -> Variants:
    variants: Variants | None = await request.app.state.registry.variants()
    if variants is None:
        raise RegistryError(503, "not connected to NATS yet: see GET /readyz")
    return variants


@router.post("", summary="Store an optimized variant (artifact uploaded first)")
async def register_variant(
    body: VariantRequest, request: Request, principal: VariantWriter
) -> JSONResponse:
    variants = await _variants(request)
    signed, created = await variants.register(body, created_by=principal.subject)
    return JSONResponse(signed.model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/{variant_id}", summary="The signed manifest of a variant")
async def get_variant(variant_id: str, request: Request, principal: Installer) -> dict[str, Any]:
    variant_id = validated(Token, variant_id, "variant id")
    signed = await (await _variants(request)).manifest_of(variant_id)
    check_readable(principal, signed.manifest)
    return signed.model_dump(mode="json")


@router.post("/{variant_id}/reports", status_code=201, summary="Store a validation report")
async def add_report(
    variant_id: str, body: ReportRequest, request: Request, principal: ReportWriter
) -> dict[str, Any]:
    variant_id = validated(Token, variant_id, "variant id")
    variants = await _variants(request)
    signed = await variants.add_report(variant_id, body, created_by=principal.subject)
    return signed.model_dump(mode="json")


@router.get("/{variant_id}/report", summary="The newest validation report of a variant")
async def latest_report(variant_id: str, request: Request, principal: Installer) -> dict[str, Any]:
    """``{"manifest": <signed report manifest>, "report": <the report JSON>}``."""
    variant_id = validated(Token, variant_id, "variant id")
    signed, report = await (await _variants(request)).latest_report(variant_id)
    check_readable(principal, signed.manifest)
    return {"manifest": signed.model_dump(mode="json"), "report": report}


class RollbackRequest(BaseModel):
    """Sign a rollback of a model to one of its variants (the rollout service asks)."""

    model_config = ConfigDict(extra="forbid")

    rollout_id: Token | None = Field(None, description="The rollout the rollback belongs to.")
    ttl_s: float | None = Field(
        None, gt=0,
        description="How long the statement holds, in seconds (at most the registry's "
        "rollback_ttl_s, its default).",
    )  # fmt: skip


@router.post("/{variant_id}/rollbacks", summary="Sign a rollback to this variant")
async def sign_rollback(
    variant_id: str, body: RollbackRequest, request: Request, _: RollbackSigner
) -> dict[str, Any]:
    variant_id = validated(Token, variant_id, "variant id")
    signed = await (await _variants(request)).manifest_of(variant_id)
    registry = request.app.state.registry
    ttl_s = min(body.ttl_s or registry.settings.rollback_ttl_s, registry.settings.rollback_ttl_s)
    expires_at = int(time.time() + ttl_s)
    statement = rollback_statement(
        signed.manifest.model_name, signed.digest, body.rollout_id, expires_at
    )
    return {
        "statement": statement.decode(),
        "signature": registry.signer.sign(statement),
        "manifest_digest": signed.digest,
        "expires_at": expires_at,
    }
