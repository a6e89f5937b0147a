"""optimizer HTTP API: jobs (list with state and progress, one, cancel) and the profiles.

Health, readiness and /v1/runtime come from the SDK for every service.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from slmops.auth import Scope
from slmops.service.auth import require
from slmops_optimizer.context import OptimizerContext
from slmops_optimizer.jobs import JobNotFound, JobStore
from slmops_optimizer.jobspec import TERMINAL_STATES, JobRecord, JobState

router = APIRouter(prefix="/v1", tags=["optimizer"], dependencies=[Depends(require(Scope.READ))])


def _context(request: Request) -> OptimizerContext:
    ctx: OptimizerContext = request.app.state.optimizer
    return ctx


async def _jobs(request: Request) -> JobStore:
    jobs = await _context(request).jobs()
    if jobs is None:
        raise HTTPException(503, "not connected to NATS yet: see GET /readyz")
    return jobs


@router.get("/jobs", summary="Optimization jobs, newest first, with state and progress")
async def list_jobs(
    request: Request,
    model: Annotated[str | None, Query(description="Only jobs of this model name.")] = None,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
) -> list[JobRecord]:
    return await (await _jobs(request)).list(model_name=model, state=state)


@router.get("/jobs/{job_id}", summary="One job (its id is the variant id it produces)")
async def get_job(job_id: str, request: Request) -> JobRecord:
    try:
        return await (await _jobs(request)).get(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    summary="Cancel a queued or running job",
    dependencies=[Depends(require(Scope.OPERATE))],
)
async def cancel_job(job_id: str, request: Request) -> JobRecord:
    jobs = await _jobs(request)
    try:
        record = await jobs.request_cancel(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    if record.state in TERMINAL_STATES:
        raise HTTPException(409, f"job {job_id} already ended: {record.state}")
    return record


@router.get("/profiles", summary="Device-class profiles the optimizer plans from")
async def profiles(request: Request) -> dict[str, Any]:
    ctx = _context(request)
    return {name: p.model_dump(mode="json") for name, p in sorted(ctx.profiles.items())}
