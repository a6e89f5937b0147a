"""registry HTTP API of a variant's device-measured figures (``/v1/variants/{id}/field``).

Per device class, the latest figures the fleet measured of the variant (``fleet.measured``, as
the lineage recorded it), as a statement signed with the registry's Ed25519 key - the key that
signs manifests and reports (``GET /v1/keys``). A reader checks ``signature`` over the UTF-8
bytes of ``statement`` exactly as given (``slmops.signatures.verify``), then reads the figures
from the statement; ``measured`` is the same statement parsed, for convenience only.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from slmops.events.payloads import Token
from slmops.service.auth import Reader
from slmops_registry.api import validated
from slmops_registry.errors import RegistryError
from slmops_registry.field import STATEMENT_KIND, field_statement
from slmops_registry.projection import LineageStore

router = APIRouter(prefix="/v1/variants", tags=["registry"])


class SignedFigures(BaseModel):
    device_class: str
    statement: str = Field(description=f"Canonical JSON ({STATEMENT_KIND}): the signed bytes.")
    signature: str = Field(description="Ed25519 signature of the statement's bytes, base64.")
    key_id: str = Field(description="The registry key that signed it (see GET /v1/keys).")
    measured: dict[str, Any] = Field(description="The statement, parsed (verify the statement).")


class VariantField(BaseModel):
    variant_id: str
    model_name: str
    version: str
    classes: list[SignedFigures] = Field(
        description="Per device class the variant was measured in: its latest figures. Empty: "
        "no fleet has measured it yet."
    )


@router.get(
    "/{variant_id}/field",
    response_model=VariantField,
    summary="The variant's device-measured figures per class, signed by the registry",
)
async def variant_field(variant_id: str, request: Request, _: Reader) -> VariantField:
    variant_id = validated(Token, variant_id, "variant id")
    registry = request.app.state.registry
    store: LineageStore | None = await registry.lineage()
    if store is None:
        raise RegistryError(503, "not connected to NATS yet: see GET /readyz")
    where = await store.locate("variant", variant_id)
    lineage = await store.get(*where) if where else None
    if where is None or lineage is None:
        raise RegistryError(404, f"no variant {variant_id} in the lineage")
    name, version = where
    classes = []
    for measured in sorted(lineage.field.values(), key=lambda m: m.device_class):
        if measured.variant_id != variant_id:
            continue
        statement = field_statement(name, version, measured)
        classes.append(SignedFigures(
            device_class=measured.device_class, statement=statement.decode(),
            signature=registry.signer.sign(statement), key_id=registry.signer.key_id,
            measured=json.loads(statement),
        ))  # fmt: skip
    return VariantField(variant_id=variant_id, model_name=name, version=version, classes=classes)
