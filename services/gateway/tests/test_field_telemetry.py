"""Field telemetry of a real gateway's serving path: mergeable histograms, decode sums, peak
memory and drift signatures in its health reports, small and without a trace of the inputs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest

from slmops.events import GatewayReport
from slmops.events.reports import report_event
from slmops.generation import Codec, GenerationSpec, Sampling
from slmops.settings import PlatformSettings
from slmops.telemetry import Sketch, embedding_moments, token_logprobs
from slmops.testing.polling import until
from slmops_gateway.app import create_app
from slmops_gateway.health import HealthWindow, bucketed
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.slots import LoadedModel, SessionOptions

REPORT_LIMIT_BYTES = 16 * 1024
CHARS = [chr(c) for c in range(32, 127)]
EOS = len(CHARS)
TOKEN_S = 0.002  # the fake's decode time per token after the first


class FakeRun:
    """What ``DecoderEngine.generate`` returns: a fixed answer, token by token, each with a
    log-probability when asked (the model grows less sure as the answer goes on)."""

    def __init__(self, tokens: list[int], sampling: Sampling, with_logprobs: bool) -> None:
        self.tokens, self.sampling, self.with_logprobs = tokens, sampling, with_logprobs
        self.finish_reason: str | None = None
        self.completion_ids: list[int] = []
        self.logprobs: list[float] = []
        self.decode_s = 0.0

    def __iter__(self) -> Iterator[int]:
        for token in self.tokens:
            if self.completion_ids:
                self.decode_s += TOKEN_S
            if self.with_logprobs:
                self.logprobs.append(-0.3 * (len(self.logprobs) + 1))
            if token == EOS:
                self.finish_reason = "stop"
                return
            self.completion_ids.append(token)
            yield token
        self.finish_reason = "length"


class FakeEngine:
    """One token per printable character; answers ``answer`` to anything."""

    def __init__(self, answer: str) -> None:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        vocab = {c: i for i, c in enumerate(CHARS)} | {"<eos>": EOS, "<unk>": EOS + 1}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
        tokenizer.decoder = decoders.Fuse()
        self.codec = Codec(tokenizer.to_str())
        self.answer = [*self.codec.encode(answer, add_special_tokens=False), EOS]
        self.context_length = 128
        self.spec = GenerationSpec(runtime_config={}, context_length=128, vocab_size=EOS + 2)

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, cancelled: Any, *,
        with_logprobs: bool = False,
    ) -> FakeRun:  # fmt: skip
        return FakeRun(self.answer, sampling, with_logprobs)


def _event_bytes(health: Any, **fields: Any) -> bytes:
    report = GatewayReport(gateway_id="gw-1", kind="health", device_class="x86-avx512-vnni",
                           labels={"site": "berlin"}, variant_id="v-1", health=health,
                           model_name="tiny", version="1.0.0", **fields)  # fmt: skip
    return report_event(report).to_json()


def test_a_busy_window_reports_mergeable_figures_in_one_small_event() -> None:
    # setup: 3,000 generations and 2,000 embedding requests (8 texts each) in one window
    rng = np.random.default_rng(0)
    window = HealthWindow()
    latencies = rng.lognormal(math.log(400), 0.8, 5000)
    ttfts = rng.lognormal(math.log(60), 0.5, 3000)
    tokens = 0
    for i, latency in enumerate(latencies):
        window.record(float(latency), ok=i % 100 != 0)
        if i < 3000:
            window.record_generation(float(ttfts[i]), 39, 0.2, bucketed(rng.uniform(-6, 0, 40)))
            tokens += 40
        else:
            window.record_embeddings(rng.normal(0.1, 1.0, (8, 384)))

    # execute
    health = window.take()
    size = len(_event_bytes(health))

    # assert: one event under 16 KB; every figure's count is the window's
    assert size < REPORT_LIMIT_BYTES, f"{size} bytes"
    assert health.request_count == 5000
    assert health.error_rate == pytest.approx(0.01)
    assert health.latency_ms is not None
    assert health.ttft_ms is not None
    assert (health.latency_ms.count, health.ttft_ms.count) == (5000, 3000)
    assert health.latency_ms.sum == pytest.approx(latencies.sum())
    for q, expected in ((0.5, health.latency_p50_ms), (0.95, health.latency_p95_ms)):
        assert health.latency_ms.quantile(q) == pytest.approx(expected, rel=0.05)
    assert health.ttft_ms.quantile(0.5) == pytest.approx(health.ttft_p50_ms, rel=0.05)
    assert (health.decode_tokens, health.decode_s) == (3000 * 39, pytest.approx(600.0))
    assert health.decode_tokens_per_s == pytest.approx(health.decode_tokens / health.decode_s)
    assert health.peak_memory_mb is not None
    assert health.peak_memory_mb > 10
    assert health.drift is not None
    assert health.drift.embedding
    assert health.drift.logprobs
    assert (health.drift.embedding.count, health.drift.embedding.dims) == (2000 * 8, 384)
    assert health.drift.logprobs.count == tokens
    mean = health.drift.logprobs.mean_logprob
    assert mean is not None
    assert -3.2 < mean < -2.8

    # a new window owes nothing to the last one
    empty = window.take()
    assert (empty.latency_ms, empty.ttft_ms, empty.drift, empty.decode_tokens) == (
        None, None, None, 0,
    )  # fmt: skip


def test_moments_of_a_window_are_the_moments_of_its_requests_and_a_new_width_wins() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(n, 32)) for n in (3, 5, 2)]
    window = HealthWindow()
    for batch in batches:
        window.record(5.0, ok=True)
        window.record_embeddings(batch)
    together = embedding_moments(np.concatenate(batches))
    drift = window.take().drift
    assert drift is not None
    assert drift.embedding is not None
    assert drift.embedding.count == together.count == 10
    assert drift.embedding.sums == pytest.approx(together.sums)
    assert drift.embedding.sumsq == pytest.approx(together.sumsq)

    # a request of the model swapped out lands first, then the new (wider) model's
    window.record_embeddings(rng.normal(size=(4, 32)))
    window.record_embeddings(rng.normal(size=(6, 64)))
    later = window.take().drift
    assert later is not None
    assert later.embedding is not None
    assert (later.embedding.dims, later.embedding.count) == (64, 6)


@dataclass
class FakeEncoder:
    """An encoder's part of a loaded model: fixed unit vectors, one per text."""

    task: str = "feature-extraction"
    engine: None = None
    session: object = object()
    embedding: object = object()
    embedding_error: str = ""
    model_id: str = "tiny-embed"
    model_name: str = "tiny-embed"
    variant_id: str = "v-embed"
    version: str = "2.0.0"

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        vectors = np.stack([np.full(16, float(len(t))) for t in texts])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), len(texts)


async def test_no_report_carries_what_was_served(tmp_path: Path) -> None:
    # setup: a real gateway app serving a fake decoder, then a fake encoder
    settings = GatewaySettings(platform=PlatformSettings(var_dir=tmp_path / "var"))
    app = create_app(settings)
    agent = app.state.agent
    engine = FakeEngine("Zanzibar-quokka-7341 reply.")
    decoder = LoadedModel("v-1", "1.0.0", Path("m.onnx"), None, "text-generation", None, [],
                          SessionOptions(), engine=cast(Any, engine),
                          model_name="tiny")  # fmt: skip
    agent.slots.swap_in(decoder)
    secrets = ["Marzipan-heliotrope-9917", "Quetzal-obsidian-5521"]
    prompt_ids = engine.codec.encode("Ultramarine-walrus-2648", add_special_tokens=False)
    answer_ids = engine.answer[:-1]
    transport = httpx.ASGITransport(app=app)

    # execute: chats (whole and streamed), a completion from token ids, then embeddings
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as api:
        for secret in secrets:
            chat = {"messages": [{"role": "user", "content": secret}], "temperature": 0}
            assert (await api.post("/v1/chat/completions", json=chat)).status_code == 200
            streamed = await api.post("/v1/chat/completions", json={**chat, "stream": True})
            assert streamed.status_code == 200
        raw = await api.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": 40})
        assert raw.status_code == 200, raw.text
        await until(lambda: agent.health.total_ok == 5, "the generations' health recorded")
        generations = agent.health_report()
        assert generations is not None

        encoder = FakeEncoder()
        agent.slots.swap_in(cast(Any, encoder))
        texts = ["Saffron-narwhal-3307 is private", "Cobalt-pangolin-8812"]
        embedded = await api.post("/v1/embeddings", json={"input": texts})
        assert embedded.status_code == 200, embedded.text
        embeddings = agent.health_report()
        assert embeddings is not None

    # assert: aggregates only - counts and sums, no text, no token id sequence
    for report in (generations, embeddings):
        wire = report_event(report).to_json()
        text = wire.decode()
        for served in [*secrets, "Ultramarine-walrus", "Zanzibar", *texts, "Saffron"]:
            assert served.lower() not in text.lower()
        for ids in (prompt_ids, answer_ids):
            for sep in (",", ", "):
                assert sep.join(map(str, ids[:4])) not in text
        assert len(wire) < REPORT_LIMIT_BYTES
        assert json.loads(wire)["data"]["health"]["request_count"] >= 1

    health = generations.health
    assert health is not None
    assert health.latency_ms is not None
    assert health.ttft_ms is not None
    assert (generations.model_name, generations.version) == ("tiny", "1.0.0")
    assert health.request_count == health.latency_ms.count == health.ttft_ms.count == 5
    answer_tokens = len(answer_ids)
    assert health.decode_tokens == 5 * (answer_tokens - 1)
    assert health.decode_s == pytest.approx(5 * answer_tokens * TOKEN_S)  # the stop token too
    assert health.decode_tokens_per_s == pytest.approx(health.decode_tokens / health.decode_s)
    assert health.drift is not None
    assert health.drift.embedding is None
    one_answer = [-0.3 * (i + 1) for i in range(answer_tokens + 1)]  # the fake's, stop incl.
    expected = token_logprobs(one_answer * 5)
    got = health.drift.logprobs
    assert got is not None
    assert (got.count, got.counts) == (expected.count, expected.counts)
    assert got.sum == pytest.approx(expected.sum)
    latencies = Sketch.of(health.latency_ms)
    assert latencies.quantile(1.0) == pytest.approx(health.latency_ms.max, rel=0.02)

    encoded = embeddings.health
    assert encoded is not None
    assert encoded.drift is not None
    assert encoded.latency_ms is not None
    assert (embeddings.model_name, embeddings.version) == ("tiny-embed", "2.0.0")
    assert encoded.request_count == encoded.latency_ms.count == 1
    assert encoded.ttft_ms is None
    assert encoded.decode_tokens == 0
    moments = encoded.drift.embedding
    assert moments is not None
    assert moments.count == 2
    assert moments.sums == pytest.approx(embedding_moments(encoder.embed(texts)[0]).sums)
