"""The OpenAI-compatible serving pieces that need no model: request validation, prompts and
budgets, the worker's text loop with stop strings (the SDK's), SSE framing, the API key, and the
routes' error shape (a gateway app with nothing installed)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from slmops.auth import LocalCredentials, scopes_of_role
from slmops.generation import Codec, GenerationSpec, Sampling
from slmops.settings import PlatformSettings
from slmops_gateway.app import create_app
from slmops_gateway.errors import BadRequest, GenerationFailed, Unauthorized
from slmops_gateway.openai_schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from slmops_gateway.serving import (
    Job,
    Outcome,
    TextRun,
    check_api_key,
    encode_vector,
    generate_text,
    prepare_chat,
    prepare_completion,
)
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.slots import LoadedModel, SessionOptions
from slmops_gateway.sse import DONE, Chunks, sse, stream

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
EOS = len(CHARS) + 1


def _char_codec() -> Codec:
    """A tokenizer with one token per character (ids easy to read back)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARS)} | {"<unk>": len(CHARS), "<eos>": EOS}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    return Codec(tokenizer.to_str())


@dataclass
class FakeRun:
    """What ``DecoderEngine.generate`` returns, replaying a fixed continuation."""

    tokens: list[int]
    sampling: Sampling
    cancelled: Any
    finish_reason: str | None = None
    completion_ids: list[int] = field(default_factory=list)
    decode_s: float = 0.0
    with_logprobs: bool = False
    logprobs: list[float] = field(default_factory=list)

    def __iter__(self) -> Iterator[int]:
        for token in self.tokens:
            if self.cancelled():
                self.finish_reason = "cancelled"
                return
            if self.completion_ids:
                self.decode_s += 0.002  # a token after the first: 500 tokens/s
            if self.with_logprobs:  # the model grows less sure as the answer goes on
                self.logprobs.append(-0.3 * (len(self.logprobs) + 1))
            if token == EOS:
                self.finish_reason = "stop"
                return
            self.completion_ids.append(token)
            yield token
            if len(self.completion_ids) >= self.sampling.max_new_tokens:
                self.finish_reason = "length"
                return
        self.finish_reason = "length"


class FakeEngine:
    def __init__(self, answer: str, *, context: int = 64, template: str | None = None) -> None:
        self.codec = _char_codec()
        self.answer = [*self.codec.encode(answer, add_special_tokens=False), EOS]
        self.context_length = context
        self.spec = GenerationSpec(runtime_config={}, context_length=context,
                                   vocab_size=EOS + 1, chat_template=template)  # fmt: skip

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, cancelled: Any, *,
        with_logprobs: bool = False,
    ) -> FakeRun:  # fmt: skip
        return FakeRun(self.answer, sampling, cancelled, with_logprobs=with_logprobs)


def _model(engine: FakeEngine, **options: Any) -> LoadedModel:
    return LoadedModel("v-1", "1.0.0", Path("m.onnx"), None, "text-generation", None, [],
                       SessionOptions(**options), engine=cast(Any, engine),
                       model_name="tiny")  # fmt: skip


def _chat(content: str = "hi", **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": content}], **fields}
    )


# --- request validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 2}, "n other than 1"),
        ({"tools": [{"type": "function"}]}, "tool calling"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.5}, "penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
        ({"response_format": {"type": "json_object"}}, "json_object"),
        ({"temperature": 3}, "less than or equal to 2"),
        ({"messages": []}, "at least 1 item"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool calling"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ],
)
def test_chat_requests_refuse_what_the_gateway_cannot_honour(
    fields: dict[str, Any], message: str
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ValidationError, match=message):
        ChatCompletionRequest.model_validate(body)


def test_chat_requests_ignore_unknown_fields_and_take_text_parts() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "anything", "user": "u-1", "some_future_option": {"x": 1}, "n": 1,
        "frequency_penalty": 0, "stop": "END",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "he"},
                                                  {"type": "text", "text": "llo"}]}],
    })  # fmt: skip
    assert [m.as_template_input() for m in request.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    assert request.stops == ("END",)


def test_completion_and_embedding_requests() -> None:
    assert CompletionRequest.model_validate({"prompt": ["one"]}).prompt_input == "one"
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompt_input == [1, 2]
    with pytest.raises(ValidationError, match="more than one prompt"):
        CompletionRequest.model_validate({"prompt": ["one", "two"]})
    with pytest.raises(ValidationError, match="echo"):
        CompletionRequest.model_validate({"prompt": "x", "echo": True})
    assert EmbeddingRequest.model_validate({"input": "a"}).texts == ["a"]
    for bad, message in [({"input": []}, "1 to 256"), ({"input": ["a", ""]}, "empty texts"),
                         ({"input": "a", "dimensions": 8}, "dimensions"),
                         ({"input": "a", "encoding_format": "hex"}, "float")]:  # fmt: skip
        with pytest.raises(ValidationError, match=message):
            EmbeddingRequest.model_validate(bad)


# --- prompts and budgets ------------------------------------------------------------------


def test_a_chat_without_template_gets_the_fallback_and_its_stops_and_the_context_budget() -> None:
    engine = FakeEngine("Paris.")
    model = _model(engine)
    job = prepare_chat(model, _chat("Capital of France?", stop="!"), started=0.0)
    assert job.prompt_text == "user: Capital of France?\nassistant:"
    assert job.prompt_ids == engine.codec.encode(job.prompt_text, add_special_tokens=False)
    assert job.stops == ("\nuser:", "!")
    assert job.sampling.max_new_tokens == 64 - len(job.prompt_ids)  # default: up to the context
    assert job.sampling.temperature == 1.0
    capped = prepare_chat(model, _chat(max_tokens=1000, temperature=0), started=0.0)
    assert capped.sampling.max_new_tokens == 64 - len(capped.prompt_ids)  # ends at the context
    assert capped.sampling.greedy
    both = prepare_chat(model, _chat(max_completion_tokens=3, max_tokens=9), started=0.0)
    assert both.sampling.max_new_tokens == 3  # the newer name wins


def test_a_model_template_is_used_and_long_prompts_are_refused() -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}>"
    model = _model(FakeEngine("ok", template=template))
    job = prepare_chat(model, _chat("hey"), started=0.0)
    assert (job.prompt_text, job.stops) == ("[user]hey>", ())
    too_long = "the prompt has 71 tokens; this model takes at most 63"
    with pytest.raises(BadRequest, match=too_long) as info:
        prepare_chat(model, _chat("x" * 64), started=0.0)
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")
    site = _model(FakeEngine("ok", template=template), max_prompt_tokens=8)
    with pytest.raises(BadRequest, match=r"at most 8 \(this site's max_input_tokens"):
        prepare_chat(site, _chat("hello"), started=0.0)


def test_completions_take_text_or_token_ids_and_encoders_are_sent_elsewhere() -> None:
    model = _model(FakeEngine("ok"))
    job = prepare_completion(model, CompletionRequest(prompt="ab"), started=0.0)
    assert (job.prompt_ids, job.add_special_tokens) == ([65, 66], True)
    assert prepare_completion(model, CompletionRequest(prompt=[1, 2]), 0.0).prompt_text is None
    with pytest.raises(BadRequest, match=r"must be in \[0, 98\)"):
        prepare_completion(model, CompletionRequest(prompt=[500]), started=0.0)
    encoder = LoadedModel("v-e", "1.0.0", Path("e.onnx"), object(), "feature-extraction", None,
                          [], SessionOptions())  # fmt: skip
    with pytest.raises(BadRequest, match="is an encoder: it serves /v1/embeddings"):
        prepare_chat(encoder, _chat(), started=0.0)


# --- the worker's text loop ---------------------------------------------------------------


def _run(answer: str, stops: tuple[str, ...] = (), max_new: int = 50,
         cancel_after: int | None = None) -> tuple[list[str], Outcome]:  # fmt: skip
    engine = FakeEngine(answer)
    job = Job(cast(Any, None), cast(Any, engine), [1, 2, 3], None, False,
              Sampling(max_new_tokens=max_new), stops, 0.0)  # fmt: skip
    pieces: list[str] = []
    cancel = threading.Event()

    def emit(piece: str) -> None:
        pieces.append(piece)
        if cancel_after is not None and len(pieces) >= cancel_after:
            cancel.set()

    return pieces, generate_text(job, cancel, emit)


def test_the_text_loop_cuts_at_stop_strings_split_over_tokens() -> None:
    pieces, outcome = _run("Paris. Next question: Rome?", stops=("Next q", "zzz"))
    assert "".join(pieces) == "Paris. "
    assert (outcome.finish_reason, outcome.stopped_by_token) == ("stop", False)
    assert outcome.completion_tokens == len("Paris. Next q")  # generation ended at the cut
    assert outcome.prompt_tokens == 3
    assert outcome.first_token_at is not None


def test_the_text_loop_ends_on_the_stop_token_the_budget_or_a_cancel() -> None:
    pieces, outcome = _run("Paris.", stops=("Paris!",))  # a held-back prefix is flushed
    assert ("".join(pieces), outcome.finish_reason, outcome.stopped_by_token) == (
        "Paris.", "stop", True,
    )  # fmt: skip
    pieces, outcome = _run("Paris is nice", max_new=5)
    assert ("".join(pieces), outcome.finish_reason, outcome.completion_tokens) == (
        "Paris", "length", 5,
    )  # fmt: skip
    pieces, outcome = _run("Paris is nice", cancel_after=2)
    assert outcome.finish_reason == "cancelled"
    assert len(pieces) == 2


# --- SSE framing --------------------------------------------------------------------------


def _events(body: bytes) -> list[Any]:
    blocks = body.decode().split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [b[len("data: ") :] if b == "data: [DONE]" else json.loads(b[len("data: ") :])
            for b in blocks[:-1]]  # fmt: skip


async def _stream_of(pieces: list[str], outcome: Outcome | Exception, chunks: Chunks) -> bytes:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Outcome] = loop.create_future()
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    for piece in [*pieces, None]:
        queue.put_nowait(piece)
    cancel = threading.Event()
    run = TextRun(cast(Any, None), future, cancel, queue)
    body = b"".join([chunk async for chunk in stream(run, chunks)])
    assert cancel.is_set()  # the generation is told to stop whatever happened
    return body


async def test_a_chat_stream_is_openai_chunks_then_done() -> None:
    outcome = Outcome("length", 7, [1, 2, 3], False, 0.0, 0.1)
    chunks = Chunks("chat", "tiny", "v-1", include_usage=True)
    events = _events(await _stream_of(["Pa", "ris"], outcome, chunks))
    assert events[-1] == "[DONE]"
    first, *texts, finish, usage = events[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [t["choices"][0]["delta"]["content"] for t in texts] == ["Pa", "ris"]
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                    "finish_reason": "length"}  # fmt: skip
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert {e["id"] for e in events[:-1]} == {chunks.id}
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "tiny"
               and e["system_fingerprint"] == "v-1" for e in events[:-1])  # fmt: skip
    assert all(e["usage"] is None for e in events[:-2])


async def test_a_text_stream_and_a_failure_mid_stream() -> None:
    outcome = Outcome("stop", 2, [1], True, 0.0, 0.0)
    events = _events(await _stream_of(["Hi"], outcome, Chunks("text", "tiny", "v-1")))
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Hi", ""]
    assert events[1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in events[0]
    failed = _events(await _stream_of(["Hi"], RuntimeError("boom"), Chunks("chat", "t", "v")))
    assert failed[-1]["error"]["code"] == "generation_failed"
    assert "boom" in failed[-1]["error"]["message"]
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


def test_vectors_as_floats_or_base64() -> None:
    import base64

    import numpy as np

    vector = np.asarray([0.5, -1.0], dtype=np.float64)
    assert encode_vector(vector, "float") == [0.5, -1.0]
    raw = base64.b64decode(cast(str, encode_vector(vector, "base64")))
    assert np.frombuffer(raw, dtype="<f4").tolist() == [0.5, -1.0]


# --- the API key --------------------------------------------------------------------------


def test_the_api_key_is_required_only_when_configured() -> None:
    check_api_key(None, None)
    check_api_key(None, SecretStr(""))  # empty: unset
    key = SecretStr("s3cret")
    check_api_key("Bearer s3cret", key)
    check_api_key("bearer  s3cret ", key)
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(Unauthorized) as info:
            check_api_key(header, key)
        assert "s3cret" not in info.value.message


# --- the routes with nothing installed ----------------------------------------------------


async def test_routes_answer_in_openai_error_shape_before_a_model_is_installed(
    tmp_path: Path, credentials: LocalCredentials
) -> None:
    settings = GatewaySettings(platform=PlatformSettings(var_dir=tmp_path / "var"), api_key="k")
    app = create_app(settings)
    auth = {"Authorization": "Bearer k"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
        unauthorized = await api.get("/v1/models")
        assert unauthorized.status_code == 401
        assert unauthorized.headers["www-authenticate"] == "Bearer"
        assert unauthorized.json()["error"]["type"] == "authentication_error"
        assert (await api.get("/v1/models", headers=auth)).json() == {"object": "list", "data": []}
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        waiting = await api.post("/v1/chat/completions", json=chat, headers=auth)
        assert waiting.status_code == 503
        assert waiting.json()["error"]["code"] == "model_not_ready"
        bad = await api.post("/v1/chat/completions", json={**chat, "n": 3}, headers=auth)
        assert bad.status_code == 400
        assert bad.json()["error"] == {
            "message": "n: n other than 1 (one choice per request; send requests in parallel) "
            "is not supported by this gateway",
            "type": "invalid_request_error", "param": "n", "code": "invalid_request",
        }  # fmt: skip
        broken = await api.post("/v1/embeddings", content=b"{", headers={
            **auth, "Content-Type": "application/json"})  # fmt: skip
        assert broken.status_code == 400
        assert broken.json()["error"]["param"] is None
        # management: a platform token, not the inference key
        assert (await api.get("/v1/slots", headers=auth)).status_code == 401
        viewer = credentials.issuer().mint("user:v", scopes_of_role("viewer"), ttl_s=60)
        slots = await api.get("/v1/slots", headers={"Authorization": f"Bearer {viewer}"})
        assert slots.status_code == 200


def test_generation_failures_are_server_errors() -> None:
    from slmops_gateway.openai_api import error_response

    response = error_response(GenerationFailed("the model failed"))
    assert response.status_code == 500
    assert json.loads(bytes(response.body))["error"]["type"] == "server_error"
