"""rollout HTTP API: the fleet as reported by its gateways (rollouts themselves come next).

Health, readiness and /v1/runtime come from the SDK for every service.
"""

from __future__ import annotations

from typing import Annotated

import nats.js.errors
from fastapi import APIRouter, HTTPException, Query, Request

from slmops_rollout.fleet import GatewayRecord
from slmops_rollout.plans import matches

router = APIRouter(prefix="/v1", tags=["rollout"])


@router.get("/gateways", summary="Registered gateways: class, labels, what they run, health")
async def gateways(
    request: Request,
    device_class: Annotated[str | None, Query(description="Only this device class.")] = None,
    selector: Annotated[list[str] | None, Query(description="key=value labels to match.")] = None,
) -> list[GatewayRecord]:
    kv = await request.app.state.gateways()
    if kv is None:
        raise HTTPException(503, "not connected to NATS yet: see GET /readyz")
    wanted = dict(s.split("=", 1) for s in selector or [] if "=" in s)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    records = [GatewayRecord.model_validate_json((await kv.get(k)).value or b"{}") for k in keys]
    return sorted(
        (r for r in records
         if (device_class is None or r.device_class == device_class) and matches(r.labels, wanted)),
        key=lambda r: r.gateway_id,
    )  # fmt: skip
