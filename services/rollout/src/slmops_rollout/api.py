"""rollout HTTP API: the fleet as its gateways report it, and rollouts (start, status).

Health, readiness and /v1/runtime come from the SDK for every service.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from slmops.auth import Principal, Scope
from slmops.events.payloads import ModelName, Version
from slmops.service.auth import Reader, require
from slmops_rollout.engine import Engine
from slmops_rollout.fleet import GatewayRecord
from slmops_rollout.plans import Overlay, WavePolicy, matches
from slmops_rollout.releases import UnknownRelease, find
from slmops_rollout.state import RolloutState, decide, figures
from slmops_rollout.steps import ACTIONS, control, wave_health
from slmops_rollout.targets import NotRollable

router = APIRouter(prefix="/v1", tags=["rollout"])

Operator = Annotated[Principal, Depends(require(Scope.OPERATE))]


async def current_engine(request: Request) -> Engine:
    engine: Engine | None = await request.app.state.engines()
    if engine is None:
        raise HTTPException(503, "not connected to NATS yet: see GET /readyz")
    return engine


@router.get("/gateways", summary="Registered gateways: class, labels, what they run, health")
async def gateways(
    request: Request,
    _: Reader,
    device_class: Annotated[str | None, Query(description="Only this device class.")] = None,
    selector: Annotated[list[str] | None, Query(description="key=value labels to match.")] = None,
) -> list[GatewayRecord]:
    engine = await current_engine(request)
    wanted = dict(s.split("=", 1) for s in selector or [] if "=" in s)
    records = await engine.gateways.all()
    return sorted(
        (r for r in records
         if (device_class is None or r.device_class == device_class) and matches(r.labels, wanted)),
        key=lambda r: r.gateway_id,
    )  # fmt: skip


class FleetPage(BaseModel):
    """One page of the fleet, and how the whole matching set splits (for filters)."""

    total: int = Field(description="Gateways matching the filters.")
    offset: int
    limit: int
    items: list[GatewayRecord]
    by_class: dict[str, int] = Field(description="Matching gateways per device class.")
    by_variant: dict[str, int] = Field(
        description="Matching gateways per running variant id ('' = nothing installed)."
    )
    by_status: dict[str, int] = Field(description="Matching gateways per last report kind.")


@router.get(
    "/fleet",
    response_model=FleetPage,
    summary="The fleet a page at a time: filtered, counted, ordered by gateway id",
)
async def fleet_page(
    request: Request,
    _: Reader,
    device_class: Annotated[str | None, Query(description="Only this device class.")] = None,
    variant: Annotated[
        str | None, Query(description="Only gateways running this variant id ('' = none).")
    ] = None,
    status: Annotated[str | None, Query(description="Only this last report kind.")] = None,
    selector: Annotated[list[str] | None, Query(description="key=value labels to match.")] = None,
    prefix: Annotated[str | None, Query(max_length=200, description="Gateway id prefix.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> FleetPage:
    engine = await current_engine(request)
    wanted = dict(s.split("=", 1) for s in selector or [] if "=" in s)
    found = [
        r for r in await engine.gateways.all()
        if (device_class is None or r.device_class == device_class)
        and (variant is None or (r.running_variant_id or "") == variant)
        and (status is None or r.last_kind == status)
        and (not prefix or r.gateway_id.startswith(prefix))
        and matches(r.labels, wanted)
    ]  # fmt: skip
    found.sort(key=lambda r: r.gateway_id)
    return FleetPage(
        total=len(found), offset=offset, limit=limit, items=found[offset : offset + limit],
        by_class=dict(Counter(r.device_class for r in found)),
        by_variant=dict(Counter(r.running_variant_id or "" for r in found)),
        by_status=dict(Counter(r.last_kind for r in found)),
    )  # fmt: skip


class StartRollout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: ModelName
    version: Version
    selector: dict[str, str] = Field(default_factory=dict, description="Labels to target.")
    policy: WavePolicy = Field(default_factory=WavePolicy)
    overlays: list[Overlay] = Field(
        default_factory=list, description="Local settings by label selector (later ones win)."
    )


@router.post("/rollouts", status_code=201, summary="Start rolling out a model version's release")
async def start(body: StartRollout, request: Request, _: Operator) -> dict[str, Any]:
    """404: nothing decided for the version yet. 409 (the request is well-formed; what the
    platform knows forbids it - 422 stays "fix your request"): the version's release failed,
    or no registered gateway matches; the detail is ``{message, reasons}``, reasons per class."""
    engine = await current_engine(request)
    try:
        release, traceparent = await find(engine.rollouts, body.model_name, body.version)
        state = await engine.start(
            release, body.selector, body.policy, body.overlays, traceparent=traceparent
        )
    except UnknownRelease as exc:
        raise HTTPException(404, str(exc)) from None
    except NotRollable as exc:
        raise HTTPException(409, {"message": str(exc), "reasons": exc.reasons}) from None
    return rollout_status(engine, state)


@router.get("/rollouts", summary="Rollouts, newest first; optionally of one model (version)")
async def list_rollouts(
    request: Request,
    _: Reader,
    model_name: Annotated[str | None, Query(description="Only this model.")] = None,
    version: Annotated[str | None, Query(description="Only this version.")] = None,
) -> list[dict[str, Any]]:
    engine = await current_engine(request)
    found = [
        s for s in await engine.all()
        if (model_name is None or s.model_name == model_name)
        and (version is None or s.version == version)
    ]  # fmt: skip
    found.sort(key=lambda s: s.started_at, reverse=True)
    return [rollout_status(engine, s) for s in found]


@router.get("/rollouts/{rollout_id}", summary="A rollout: each wave's progress, gate figures")
async def status(rollout_id: str, request: Request, _: Reader) -> dict[str, Any]:
    engine = await current_engine(request)
    state = await engine.get(rollout_id)
    if state is None:
        raise HTTPException(404, f"no rollout {rollout_id}")
    return rollout_status(engine, state)


class Control(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500, description="Why, for the rollout's record.")


_CONTROL = "pause, resume, cancel, approve (the next wave) or roll back a rollout"


@router.post("/rollouts/{rollout_id}/{action}", summary=_CONTROL)
async def control_rollout(
    rollout_id: str, action: str, body: Control, request: Request, principal: Operator
) -> dict[str, Any]:
    if action not in ACTIONS:
        raise HTTPException(404, f"no action {action!r}: one of {', '.join(ACTIONS)}")
    engine = await current_engine(request)
    try:
        # The rollout's record says who acted (the audit trail), then why.
        why = f"{action} by {principal.subject}" + (f": {body.reason}" if body.reason else "")
        state = await control(engine, rollout_id, action, why)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    return rollout_status(engine, state)


def rollout_status(engine: Engine, state: RolloutState) -> dict[str, Any]:
    counts: dict[str, int] = {}
    per_wave: list[dict[str, int]] = [{} for _ in state.waves]
    for progress in state.gateways.values():
        counts[progress.status] = counts.get(progress.status, 0) + 1
        wave = per_wave[progress.wave]
        wave[progress.status] = wave.get(progress.status, 0) + 1
    now = datetime.now(UTC)
    live = engine.live.get(state.rollout_id)  # its tally, or (not loaded here) a count afresh
    current = live.figures(now) if live is not None and live.state is state else figures(state, now)
    decision = decide(state, now, wave_health(engine, state), current)
    return {
        "rollout_id": state.rollout_id, "release_id": state.release_id,
        "model_name": state.model_name, "version": state.version, "status": state.status,
        "reason": state.reason, "skipped_classes": state.skipped,
        "wave_index": state.wave_index,
        "waves": [len(w) for w in state.waves], "gateways": counts,
        "wave_progress": [{"index": i, "targets": len(w), "gateways": per_wave[i]}
                          for i, w in enumerate(state.waves)],
        "current_wave": current.model_dump(),
        "gates": {"next_step": decision.action, "why": decision.reason,
                  "breached": decision.breached},
        "policy": state.policy.model_dump(),
        "approved_waves": state.approved_waves,
    }  # fmt: skip
