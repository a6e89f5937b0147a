"""rollout HTTP API of proposed releases (``/v1/proposals``): what field evidence proposes,
and an operator's approval (a rollout of it starts) or rejection.

A proposal's release covers one device class (the one whose field figures broke its budget);
its rollout reaches only that class's gateways running the model. Who decided is the caller's
token subject, kept with the proposal.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from slmops.auth import Principal, Scope
from slmops.service.auth import Reader, require
from slmops_rollout import proposals
from slmops_rollout.api import current_engine, rollout_status
from slmops_rollout.engine import Engine
from slmops_rollout.plans import WavePolicy
from slmops_rollout.proposals import Proposal, ProposalStatus, Undecidable, UnknownProposal
from slmops_rollout.targets import NotRollable

router = APIRouter(prefix="/v1/proposals", tags=["proposals"])

Operator = Annotated[Principal, Depends(require(Scope.OPERATE))]
CurrentEngine = Annotated[Engine, Depends(current_engine)]


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: WavePolicy | None = Field(None, description="How it rolls out (default: the normal).")
    reason: str = Field("", max_length=500, description="Why, for the proposal's record.")


class Rejection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, description="Why, for the record.")


class Decision(BaseModel):
    proposal: Proposal
    rollout: dict[str, Any] | None = Field(
        None, description="The rollout an approval started (as GET /v1/rollouts/{id})."
    )


@router.get(
    "", response_model=list[Proposal], summary="Proposed releases and their evidence, newest first"
)
async def list_proposals(
    _: Reader,
    engine: CurrentEngine,
    status: Annotated[ProposalStatus | None, Query(description="Only this status.")] = None,
    model_name: Annotated[str | None, Query(description="Only this model.")] = None,
) -> list[Proposal]:
    found = [
        p for p in await proposals.every(engine.rollouts)
        if (status is None or p.status == status)
        and (model_name is None or p.model_name == model_name)
    ]  # fmt: skip
    return sorted(found, key=lambda p: p.received_at, reverse=True)


@router.get("/{release_id}", response_model=Proposal, summary="One proposed release")
async def get_proposal(release_id: str, _: Reader, engine: CurrentEngine) -> Proposal:
    try:
        return await proposals.get(engine.rollouts, release_id)
    except UnknownProposal as exc:
        raise HTTPException(404, str(exc)) from None


@router.post(
    "/{release_id}/approve",
    response_model=Decision,
    summary="Approve a proposed release: its rollout starts (the same one if approved already)",
)
async def approve(
    release_id: str, body: Approval, principal: Operator, engine: CurrentEngine
) -> Decision:
    """404: no such proposal. 409: rejected already, or no registered gateway of its class runs
    the model (it stays pending; the detail is ``{message, reasons}``). 422: a failed proposal
    (no candidate met the field budget), with the reasons."""
    try:
        proposal, state = await proposals.approve(
            engine, release_id, principal.subject, body.policy, body.reason
        )
    except UnknownProposal as exc:
        raise HTTPException(404, str(exc)) from None
    except Undecidable as exc:
        raise HTTPException(422 if exc.proposal.status == "failed" else 409, str(exc)) from None
    except NotRollable as exc:
        raise HTTPException(409, {"message": str(exc), "reasons": exc.reasons}) from None
    return Decision(proposal=proposal, rollout=rollout_status(engine, state))


@router.post("/{release_id}/reject", response_model=Decision, summary="Reject a proposed release")
async def reject(
    release_id: str, body: Rejection, principal: Operator, engine: CurrentEngine
) -> Decision:
    """404: no such proposal. 409: decided already. 422: a failed proposal (nothing to reject)."""
    try:
        proposal = await proposals.reject(engine, release_id, principal.subject, body.reason)
    except UnknownProposal as exc:
        raise HTTPException(404, str(exc)) from None
    except Undecidable as exc:
        raise HTTPException(422 if exc.proposal.status == "failed" else 409, str(exc)) from None
    return Decision(proposal=proposal)
