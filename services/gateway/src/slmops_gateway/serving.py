"""Local inference behind the OpenAI-compatible routes: prompts, runs, embeddings (no HTTP here).

A request reads the active model once (:func:`active_model`) and finishes on it, so a hot swap
never breaks a running answer. A generation becomes a :class:`Job` (prompt token ids, sampling,
stop strings), runs in a worker thread of the :class:`~slmops_gateway.pool.GenerationPool` with
its own :class:`~slmops.generation.Generation` (its own KV cache), and hands text back through
an asyncio queue: the same text pieces make a streamed answer and, joined, a whole one, so the
two never differ. Stop strings are cut in the worker (the SDK's :class:`StopStrings`), which
then stops generating. Health counts only requests that reached the model: a bad request says
nothing about a model, and a client that left mid-answer gives no latency worth reporting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import numpy as np
from pydantic import SecretStr

from slmops.generation import ChatTemplateError, DecoderEngine, Sampling, StopStrings, render_chat
from slmops.telemetry import TokenLogprobs
from slmops_gateway.errors import BadRequest, GenerationFailed, NoModel, Unauthorized
from slmops_gateway.health import HealthWindow, bucketed
from slmops_gateway.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from slmops_gateway.pool import GenerationPool
from slmops_gateway.slots import LoadedModel, Slots

log = logging.getLogger(__name__)


def check_api_key(authorization: str | None, key: SecretStr | None) -> None:
    """Pass when no key is configured, or the header is ``Bearer <key>`` (constant-time)."""
    expected = key.get_secret_value() if key is not None else ""
    if not expected:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    sent = token.strip().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, expected.encode()):
        raise Unauthorized(
            "this gateway requires an API key: send the header `Authorization: Bearer <key>` "
            "with the key set in SLMOPS_GATEWAY_API_KEY"
        )


def active_model(slots: Slots) -> LoadedModel:
    model = slots.active  # read once: the request finishes on this model
    if model is None:
        raise NoModel("no model installed yet: the gateway waits for its first assignment")
    return model


@dataclass(frozen=True)
class Job:
    """One generation, ready to run on ``model``."""

    model: LoadedModel
    engine: DecoderEngine
    prompt_ids: list[int]
    prompt_text: str | None  # the rendered prompt (None: the caller sent token ids)
    add_special_tokens: bool  # how prompt_text was tokenized
    sampling: Sampling
    stops: tuple[str, ...]
    started: float  # perf_counter() when the request arrived


def prepare_chat(model: LoadedModel, request: ChatCompletionRequest, started: float) -> Job:
    """Messages through the model's chat template (or the SDK's fallback transcript and its
    stop strings), tokenized without adding special tokens again, as transformers does."""
    engine = _decoder(model, "/v1/chat/completions")
    messages = [m.as_template_input() for m in request.messages]
    try:
        prompt = render_chat(messages, engine.spec.chat_template, engine.spec.special_tokens)
    except ChatTemplateError as exc:
        raise BadRequest(str(exc), param="messages") from None
    ids = engine.codec.encode(prompt.text, add_special_tokens=False)
    stops = prompt.stops + request.stops
    return _job(model, engine, request, ids, prompt.text, False, stops, started, "messages")


def prepare_completion(model: LoadedModel, request: CompletionRequest, started: float) -> Job:
    """A raw prompt, tokenized as the model's tokenizer does for plain text (its BOS and all),
    or token ids sent as they are."""
    engine = _decoder(model, "/v1/completions")
    prompt = request.prompt_input
    if isinstance(prompt, str):
        ids = engine.codec.encode(prompt, add_special_tokens=True)
        return _job(model, engine, request, ids, prompt, True, request.stops, started, "prompt")
    ids = [int(i) for i in prompt]
    vocab = engine.spec.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
    return _job(model, engine, request, ids, None, False, request.stops, started, "prompt")


def _decoder(model: LoadedModel, route: str) -> DecoderEngine:
    if model.engine is not None:
        return model.engine
    if model.task == "feature-extraction":
        message = f"the active model {model.model_id} is an encoder: it serves /v1/embeddings"
    else:
        message = (f"the active model {model.model_id} is not a generation-ready decoder "
                   "(its file carries no generation spec): re-optimize it")  # fmt: skip
    raise BadRequest(f"{message}, not {route}", param="model", code="model_not_supported")


def _job(
    model: LoadedModel, engine: DecoderEngine, request: SamplingFields, ids: list[int],
    text: str | None, special: bool, stops: tuple[str, ...], started: float, param: str,
) -> Job:  # fmt: skip
    context = engine.context_length
    limit, why = context - 1, f"its context holds {context} and one token must fit"
    cap = model.options.max_prompt_tokens
    if cap is not None and cap < limit:
        limit, why = cap, "this site's max_input_tokens"
    if not ids:
        raise BadRequest("the prompt is empty", param=param)
    if len(ids) > limit:
        raise BadRequest(f"the prompt has {len(ids)} tokens; this model takes at most {limit} "
                         f"({why}): shorten it", param=param,
                         code="context_length_exceeded")  # fmt: skip
    room = context - len(ids)
    budget = request.token_budget or room
    sampling = Sampling(
        max_new_tokens=min(budget, room),  # a larger max_tokens ends at the context: "length"
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
    )
    return Job(model, engine, ids, text, special, sampling, stops, started)


@dataclass(frozen=True)
class Outcome:
    finish_reason: str  # stop, length or cancelled
    prompt_tokens: int
    completion_ids: list[int]
    stopped_by_token: bool  # the model ended its turn (not a stop string, not the budget)
    first_token_at: float | None  # perf_counter() of the first token
    decode_s: float  # engine time of every token after the first
    # The model's log-probabilities of the produced tokens, bucketed in the worker thread:
    # the health window's drift signature (never reported one by one)
    logprobs: TokenLogprobs | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)


def generate_text(job: Job, cancel: threading.Event, emit: Callable[[str], None]) -> Outcome:
    """The worker thread's loop: tokens → text pieces (``emit``) until a stop token, a stop
    string, the budget or ``cancel``."""
    run = job.engine.generate(job.prompt_ids, job.sampling, cancelled=cancel.is_set,
                              with_logprobs=True)  # fmt: skip
    detokenizer = job.engine.codec.detokenizer()
    stops = StopStrings(job.stops)
    first: float | None = None
    tokens = iter(run)
    try:
        for token in tokens:
            if first is None:
                first = time.perf_counter()
            if piece := stops.push(detokenizer.add(token)):
                emit(piece)
            if stops.stopped:
                break
        else:
            tail = stops.push(detokenizer.flush())
            if tail := tail + stops.flush():
                emit(tail)
    finally:
        close = getattr(tokens, "close", None)  # a generator: frees its KV cache now
        if close is not None:
            close()
    finish = "stop" if stops.stopped else run.finish_reason or "length"
    return Outcome(finish, len(job.prompt_ids), list(run.completion_ids),
                   run.finish_reason == "stop", first, run.decode_s,
                   bucketed(run.logprobs))  # fmt: skip


class TextRun:
    """A started generation: its text pieces as they come, then its :class:`Outcome`."""

    def __init__(
        self, job: Job, future: asyncio.Future[Outcome], cancel: threading.Event,
        queue: asyncio.Queue[str | None],
    ) -> None:  # fmt: skip
        self.job = job
        self.outcome: Outcome | None = None  # set once the run finished
        self._future, self._cancel, self._queue = future, cancel, queue

    async def pieces(self) -> AsyncGenerator[str, None]:
        """Text as generated; leaving early (a client that went away) cancels the generation
        at its next token."""
        try:
            while (piece := await self._queue.get()) is not None:
                yield piece
            try:
                self.outcome = await self._future
            except Exception as exc:
                raise GenerationFailed(f"the model failed while generating: {exc}") from exc
        finally:
            self._cancel.set()

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def cancel(self) -> None:
        self._cancel.set()


async def start_text(pool: GenerationPool, health: HealthWindow, job: Job) -> TextRun:
    """Queue ``job`` for a worker thread (:class:`~slmops_gateway.errors.Saturated` when no
    turn frees up in time); its health is recorded when the thread finishes."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def emit(piece: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody reads any more
            loop.call_soon_threadsafe(queue.put_nowait, piece)

    future, cancel = await pool.submit(lambda c: generate_text(job, c, emit))
    # Runs on the loop after every piece the worker queued: the end-of-text mark comes last.
    future.add_done_callback(lambda _: queue.put_nowait(None))
    future.add_done_callback(lambda f: _record(health, job, f))
    return TextRun(job, future, cancel, queue)


def _record(health: HealthWindow, job: Job, future: asyncio.Future[Outcome]) -> None:
    latency_ms = (time.perf_counter() - job.started) * 1000
    if future.cancelled():
        return
    if (exc := future.exception()) is not None:
        log.warning("generation on %s failed: %s", job.model.variant_id, exc)
        health.record(latency_ms, ok=False)
        return
    outcome = future.result()
    if outcome.finish_reason == "cancelled":
        return
    health.record(latency_ms, ok=True)
    first = outcome.first_token_at
    ttft_ms = None if first is None else (first - job.started) * 1000
    health.record_generation(ttft_ms, max(outcome.completion_tokens - 1, 0), outcome.decode_s,
                             outcome.logprobs)  # fmt: skip


async def embed(
    pool: GenerationPool, health: HealthWindow, model: LoadedModel, texts: list[str],
    started: float,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """Unit-length embeddings of ``texts`` on an encoder, and the tokens read."""
    if model.engine is not None or model.session is None:
        raise BadRequest(f"the active model {model.model_id} is a decoder: it serves "
                         "/v1/chat/completions and /v1/completions, not /v1/embeddings",
                         param="model", code="model_not_supported")  # fmt: skip
    if model.embedding is None:
        raise BadRequest(f"the active model {model.model_id} cannot embed: {model.embedding_error}",
                         param="model", code="model_not_supported")  # fmt: skip

    def work(_cancel: threading.Event) -> tuple[np.ndarray, int]:
        vectors, tokens = model.embed(texts)
        health.record_embeddings(vectors)  # the drift signature: moments, not the vectors
        return vectors, tokens

    future, _ = await pool.submit(work)
    try:
        result = await future
    except Exception as exc:
        health.record((time.perf_counter() - started) * 1000, ok=False)
        raise GenerationFailed(f"the model failed to embed: {exc}") from exc
    health.record((time.perf_counter() - started) * 1000, ok=True)
    return result


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or base64 of little-endian float32 (OpenAI's binary form)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(v) for v in vector]
