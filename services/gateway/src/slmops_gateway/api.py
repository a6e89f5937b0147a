"""gateway HTTP API (127.0.0.1): local inference and the model slots.

Inputs and outputs of inference never leave the device: only aggregates are reported.
Health, readiness and /v1/runtime come from the SDK for every service.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field, model_validator

from slmops_gateway.agent import Agent

router = APIRouter(prefix="/v1", tags=["gateway"])


class InferRequest(BaseModel):
    texts: list[str] | None = Field(None, max_length=64, description="Texts to run.")
    ids: list[list[int]] | None = Field(None, max_length=64, description="Or token id rows.")

    @model_validator(mode="after")
    def _one_input(self) -> InferRequest:
        if (self.texts is None) == (self.ids is None):
            raise ValueError("send either 'texts' or 'ids'")
        return self


@router.post("/infer", summary="Run the active model on local inputs")
async def infer(body: InferRequest, request: Request) -> dict[str, Any]:
    agent: Agent = request.app.state.agent
    model = agent.slots.active  # read once: the request finishes on this model
    if model is None:
        raise HTTPException(503, "no model installed yet: the gateway waits for an assignment")
    started = time.perf_counter()
    try:
        outputs = await asyncio.to_thread(model.run, body.texts, body.ids)
    except ValueError as exc:
        agent.health.record((time.perf_counter() - started) * 1000, ok=False)
        raise HTTPException(422, str(exc)) from None
    agent.health.record((time.perf_counter() - started) * 1000, ok=True)
    if model.task == "text-generation":
        result: list[Any] = [int(out[0, -1].argmax()) for out in outputs]  # next token ids
    else:
        result = [np.asarray(out[0].mean(axis=0)).tolist() for out in outputs]  # embeddings
    return {"variant_id": model.variant_id, "version": model.version, "outputs": result}


@router.get("/slots", summary="The active and previous models")
async def slots(request: Request) -> dict[str, Any]:
    agent: Agent = request.app.state.agent

    def describe(model: Any) -> dict[str, Any] | None:
        if model is None:
            return None
        return {"variant_id": model.variant_id, "version": model.version,
                "loaded_at": model.loaded_at.isoformat()}  # fmt: skip

    return {"active": describe(agent.slots.active), "previous": describe(agent.slots.previous),
            "generation": agent.generation}  # fmt: skip
