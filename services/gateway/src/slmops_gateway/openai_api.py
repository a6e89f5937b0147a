"""OpenAI-compatible local inference on 127.0.0.1: chat, text completions, embeddings, models.

The only module that turns the serving domain into HTTP: status codes and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` (a malformed request is a 400 in that shape,
not FastAPI's 422, so OpenAI client libraries show the message). Like Ollama's and llama.cpp's
servers these routes answer local callers without credentials unless
``SLMOPS_GATEWAY_API_KEY`` is set; the gateway's management routes are not affected by it.
Shadow comparisons run as background tasks, i.e. after the answer was sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from slmops_gateway import shadow
from slmops_gateway.agent import Agent
from slmops_gateway.errors import (
    BadRequest,
    GenerationFailed,
    NoModel,
    Saturated,
    ServingError,
    Unauthorized,
)
from slmops_gateway.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
)
from slmops_gateway.pool import GenerationPool
from slmops_gateway.serving import (
    TextRun,
    active_model,
    check_api_key,
    embed,
    encode_vector,
    prepare_chat,
    prepare_completion,
    start_text,
)
from slmops_gateway.slots import LoadedModel
from slmops_gateway.sse import Chunks, stream, usage_of

_STATUS: list[tuple[type[ServingError], int, str]] = [
    (BadRequest, 400, "invalid_request_error"),
    (Unauthorized, 401, "authentication_error"),
    (NoModel, 503, "server_error"),
    (Saturated, 503, "server_error"),
    (GenerationFailed, 500, "server_error"),
]
_DISCONNECT_POLL_S = 1.0  # how often a non-streamed answer checks that its caller is still there


def error_response(exc: ServingError) -> JSONResponse:
    status, kind = next((s, k) for t, s, k in _STATUS if isinstance(exc, t))
    body = ErrorBody(error=ErrorDetail(message=exc.message, type=kind, param=exc.param,
                                       code=exc.code))  # fmt: skip
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if isinstance(exc, Saturated):
        headers["Retry-After"] = "1"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def validation_error(exc: RequestValidationError) -> BadRequest:
    """FastAPI's validation failure as one OpenAI-style message naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = None if first.get("type") == "json_invalid" else ".".join(loc) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return BadRequest(f"{param}: {message}" if param else message, param=param)


class OpenAIRoute(APIRoute):
    """A route whose failures are answered in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(validation_error(exc))
            except ServingError as exc:
                return error_response(exc)

        return with_openai_errors


def _agent(request: Request) -> Agent:
    agent: Agent = request.app.state.agent
    return agent


def _pool(request: Request) -> GenerationPool:
    pool: GenerationPool = request.app.state.generation_pool
    return pool


AgentDep = Annotated[Agent, Depends(_agent)]
PoolDep = Annotated[GenerationPool, Depends(_pool)]


async def require_api_key(
    agent: AgentDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    check_api_key(authorization, agent.settings.api_key)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 500, 503)
}
router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute, responses=_ERRORS,
                   dependencies=[Depends(require_api_key)])  # fmt: skip


def _streaming(run: TextRun, chunks: Chunks) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(run, chunks), media_type="text/event-stream", headers=headers)


async def _whole(run: TextRun, request: Request) -> str:
    """The whole answer; a caller that hangs up stops the generation."""
    task = asyncio.ensure_future(run.text())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                run.cancel()
    finally:
        if not task.done():
            run.cancel()
            task.cancel()


async def _shadow_generation(agent: Agent, pool: GenerationPool, run: TextRun) -> None:
    await shadow.after_generation(agent, pool, run.job, run.outcome)


@router.post("/chat/completions", response_model=ChatCompletion,
             summary="Chat with the active model (OpenAI-compatible; stream: SSE)")  # fmt: skip
async def chat_completions(
    body: ChatCompletionRequest, request: Request, agent: AgentDep, pool: PoolDep,
    background: BackgroundTasks,
) -> ChatCompletion | StreamingResponse:  # fmt: skip
    started = time.perf_counter()
    model = active_model(agent.slots)
    run = await start_text(pool, agent.health, prepare_chat(model, body, started))
    background.add_task(_shadow_generation, agent, pool, run)
    if body.stream:
        chunks = Chunks("chat", model.model_id, model.variant_id, body.include_usage)
        return _streaming(run, chunks)
    text = await _whole(run, request)
    assert run.outcome is not None
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.model_id,
        system_fingerprint=model.variant_id, usage=usage_of(run.outcome),
        choices=[ChatChoice(message=AssistantMessage(content=text),
                            finish_reason=run.outcome.finish_reason)],
    )  # fmt: skip


@router.post("/completions", response_model=Completion,
             summary="Continue a raw prompt (OpenAI-compatible; stream: SSE)")  # fmt: skip
async def completions(
    body: CompletionRequest, request: Request, agent: AgentDep, pool: PoolDep,
    background: BackgroundTasks,
) -> Completion | StreamingResponse:  # fmt: skip
    started = time.perf_counter()
    model = active_model(agent.slots)
    run = await start_text(pool, agent.health, prepare_completion(model, body, started))
    background.add_task(_shadow_generation, agent, pool, run)
    if body.stream:
        return _streaming(run, Chunks("text", model.model_id, model.variant_id, body.include_usage))
    text = await _whole(run, request)
    assert run.outcome is not None
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.model_id,
        system_fingerprint=model.variant_id, usage=usage_of(run.outcome),
        choices=[CompletionChoice(text=text, finish_reason=run.outcome.finish_reason)],
    )  # fmt: skip


@router.post("/embeddings", response_model=EmbeddingList,
             summary="Embed texts with the active encoder (OpenAI-compatible)")  # fmt: skip
async def embeddings(
    body: EmbeddingRequest, agent: AgentDep, pool: PoolDep, background: BackgroundTasks
) -> EmbeddingList:
    started = time.perf_counter()
    model = active_model(agent.slots)
    texts = body.texts
    vectors, tokens = await embed(pool, agent.health, model, texts, started)
    background.add_task(shadow.after_embedding, agent, pool, texts, vectors)
    data = [Embedding(index=i, embedding=encode_vector(v, body.encoding_format))
            for i, v in enumerate(vectors)]  # fmt: skip
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return EmbeddingList(data=data, model=model.model_id, usage=usage)


def model_card(model: LoadedModel) -> ModelCard:
    engine = model.engine
    return ModelCard(
        id=model.model_id, created=int(model.loaded_at.timestamp()), variant_id=model.variant_id,
        version=model.version, task=model.task, chat=engine is not None,
        context_length=engine.context_length if engine is not None else None,
    )  # fmt: skip


@router.get("/models", response_model=ModelList, summary="The model this gateway serves")
async def models(agent: AgentDep) -> ModelList:
    model = agent.slots.active
    return ModelList(data=[] if model is None else [model_card(model)])
