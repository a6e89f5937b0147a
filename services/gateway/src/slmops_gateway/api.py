"""gateway HTTP API (127.0.0.1): local inference and the model slots.

Inputs and outputs of inference never leave the device: only aggregates are reported.
Health, readiness and /v1/runtime come from the SDK for every service.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from pydantic import BaseModel, Field, model_validator

from slmops.auth import Scope
from slmops.service.auth import require
from slmops_gateway.agent import Agent
from slmops_gateway.errors import Unauthorized
from slmops_gateway.serving import check_api_key
from slmops_gateway.slots import LoadedModel

router = APIRouter(prefix="/v1", tags=["gateway"])


class InferRequest(BaseModel):
    texts: list[str] | None = Field(None, max_length=64, description="Texts to run.")
    ids: list[list[int]] | None = Field(None, max_length=64, description="Or token id rows.")

    @model_validator(mode="after")
    def _one_input(self) -> InferRequest:
        if (self.texts is None) == (self.ids is None):
            raise ValueError("send either 'texts' or 'ids'")
        return self


async def local_caller(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Inference answers local callers, with the gateway's API key when one is set."""
    try:
        check_api_key(authorization, request.app.state.agent.settings.api_key)
    except Unauthorized as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


@router.post(
    "/infer",
    summary="Run the active model on local inputs",
    dependencies=[Depends(local_caller)],
)
async def infer(body: InferRequest, request: Request) -> dict[str, Any]:
    agent: Agent = request.app.state.agent
    model = agent.slots.active  # read once: the request finishes on this model
    if model is None:
        raise HTTPException(503, "no model installed yet: the gateway waits for an assignment")
    if model.engine is not None:
        raise HTTPException(
            400, f"the active model {model.model_id} is a generation-ready decoder: use "
            "POST /v1/chat/completions (or /v1/completions)",
        )  # fmt: skip
    started = time.perf_counter()
    try:
        outputs = await asyncio.to_thread(model.run, body.texts, body.ids)
    except ValueError as exc:
        agent.health.record((time.perf_counter() - started) * 1000, ok=False)
        raise HTTPException(422, str(exc)) from None
    agent.health.record((time.perf_counter() - started) * 1000, ok=True)
    result = summarize(model, outputs)
    previous = agent.slots.previous
    rate = agent.settings.shadow_sample_rate
    if agent.shadowing and previous is not None and random.random() < rate:  # noqa: S311
        task = asyncio.create_task(_shadow(agent, previous, body, result))  # after the answer
        _SHADOWS.add(task)
        task.add_done_callback(_SHADOWS.discard)
    return {"variant_id": model.variant_id, "version": model.version, "outputs": result}


_SHADOWS: set[asyncio.Task[None]] = set()  # running shadow comparisons (kept referenced)


def summarize(model: LoadedModel, outputs: list[Any]) -> list[Any]:
    """Per input: the next token id (generation) or the mean-pooled embedding."""
    if model.task == "text-generation":
        return [int(out[0, -1].argmax()) for out in outputs]
    return [np.asarray(out[0].mean(axis=0)).tolist() for out in outputs]


def agreement(a: Any, b: Any) -> float:
    """Same next token (1 or 0), or the cosine of two embeddings clipped to [0, 1]."""
    if isinstance(a, int) or isinstance(b, int):
        return float(a == b)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        return 0.0
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(np.clip(x @ y / norm, 0.0, 1.0)) if norm else 0.0


async def _shadow(
    agent: Agent, previous: LoadedModel, body: InferRequest, served: list[Any]
) -> None:
    try:
        before = summarize(previous, await asyncio.to_thread(previous.run, body.texts, body.ids))
    except Exception:  # the previous model cannot run this input: nothing to compare
        return
    for new, old in zip(served, before, strict=False):
        agent.health.record_shadow(agreement(new, old))


@router.get(
    "/slots",
    summary="The active and previous models (management: a platform token)",
    dependencies=[Depends(require(Scope.READ))],
)
async def slots(request: Request) -> dict[str, Any]:
    agent: Agent = request.app.state.agent

    def describe(model: Any) -> dict[str, Any] | None:
        if model is None:
            return None
        return {"variant_id": model.variant_id, "version": model.version,
                "loaded_at": model.loaded_at.isoformat()}  # fmt: skip

    return {"active": describe(agent.slots.active), "previous": describe(agent.slots.previous),
            "generation": agent.generation}  # fmt: skip
