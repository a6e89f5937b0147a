"""The optimizer service end to end on real parts: a model published through the registry
becomes stored variants (real NATS, moto S3, ONNX Runtime, Ray Serve's handle API)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from slmops.bus import Bus
from slmops.events import new_event
from slmops.objectstore import ObjectStore
from slmops.settings import PlatformSettings
from slmops.testing.events import await_events, stream_count

pytestmark = [pytest.mark.integration]


def _store() -> ObjectStore:
    return ObjectStore.from_settings(PlatformSettings())


@pytest.mark.slow
async def test_minilm_becomes_a_stored_int8_variant_with_its_search_trail(
    pipeline: Any, bus: Bus, minilm_folder: Path, tmp_path: Path, pack: Callable[[Path], bytes]
) -> None:
    # setup / execute: publish the real all-MiniLM-L6-v2 folder for the test class
    published = await pipeline.publish(
        pack(minilm_folder),
        model_name="minilm",
        format="hf-safetensors",
        task="feature-extraction",
        device_classes=["test-cpu"],
    )
    planned, done = await _outcomes(bus, jobs=1)

    # assert: one job planned and completed, its variant stored with a signed manifest
    assert [j.recipe_name for j in planned.data.jobs] == ["int8-dynamic"]
    completed = done[0]
    assert completed.type == "slmops.optimization.completed.v1", completed.data
    variant_id = completed.data.variant_id
    assert variant_id == planned.data.jobs[0].variant_id
    assert completed.data.parent_digest == published["manifest"]["artifact"]["digest"]
    manifest = (await pipeline.registry.get(f"/v1/variants/{variant_id}")).json()["manifest"]
    trail = manifest["details"]["search_trail"]
    assert trail[-1]["meets_floor"] is True
    assert trail[-1]["quality"] >= 0.98
    fp32_mb = manifest["metrics"]["fp32_size_mb"]
    assert manifest["metrics"]["size_mb"] < fp32_mb / 3.5  # int8 weights: about a quarter
    assert any("convert: export checked" in line for line in manifest["details"]["pass_log"])

    # the artifact is a self-describing ONNX model: task and tokenizer travel in its metadata
    local = tmp_path / "variant.onnx"
    _store().get_to_file(completed.data.artifact.digest, local)
    props = {p.key: p.value for p in onnx.load(str(local)).metadata_props}
    assert props["slmops.task"] == "feature-extraction"
    assert '"vocab"' in props["slmops.tokenizer"]

    job = (await pipeline.optimizer.get(f"/v1/jobs/{variant_id}")).json()
    assert (job["state"], job["progress"]) == ("succeeded", 1.0)
    assert pipeline.scratch_files() == []

    # a repeated announcement reuses the stored variant: no second computation, no new event
    original = (await await_events(bus, "slmops.model.published.v1", count=1))[0]
    await bus.publish(new_event(original.data, source="/test"))
    await _wait_state(pipeline, variant_id, "reused")
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.optimization.completed.v1") == 1


async def _outcomes(bus: Bus, *, jobs: int, timeout_s: float = 240) -> tuple[Any, list[Any]]:
    planned = (await await_events(bus, "slmops.optimization.planned.v1", count=1))[0]
    outcomes = await await_events(
        bus, "slmops.optimization.*.v1", count=1 + jobs, timeout_s=timeout_s
    )
    return planned, [e for e in outcomes if e.type != "slmops.optimization.planned.v1"]


async def _wait_state(pipeline: Any, job_id: str, state: str, timeout_s: float = 60) -> None:
    import asyncio

    for _ in range(int(timeout_s / 0.2)):
        response = await pipeline.optimizer.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200 and response.json()["state"] == state:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {state}: {response.text}")


async def test_a_tiny_onnx_model_is_quantized_and_the_jobs_api_lists_it(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    await pipeline.publish(tiny_onnx(), model_name="tiny", format="onnx", task="feature-extraction")
    planned, done = await _outcomes(bus, jobs=1, timeout_s=120)

    assert done[0].type == "slmops.optimization.completed.v1", done[0].data
    listed = (await pipeline.optimizer.get("/v1/jobs", params={"model": "tiny"})).json()
    assert [(j["job_id"], j["state"]) for j in listed] == [
        (planned.data.jobs[0].variant_id, "succeeded")
    ]
    assert (await pipeline.optimizer.get("/v1/jobs", params={"model": "other"})).json() == []
    missing = await pipeline.optimizer.post("/v1/jobs/v-unknown/cancel")
    assert missing.status_code == 404
    finished = await pipeline.optimizer.post(f"/v1/jobs/{planned.data.jobs[0].variant_id}/cancel")
    assert finished.status_code == 409
    assert "already ended" in finished.json()["detail"]


@pytest.mark.slow
async def test_a_running_job_is_cancelled_through_the_api(
    pipeline: Any, bus: Bus, minilm_folder: Path, pack: Callable[[Path], bytes]
) -> None:
    await pipeline.publish(
        pack(minilm_folder), model_name="minilm", format="hf-safetensors", task="feature-extraction"
    )
    planned = (await await_events(bus, "slmops.optimization.planned.v1", count=1))[0]
    job_id = planned.data.jobs[0].variant_id
    await _wait_state(pipeline, job_id, "running")

    cancelled = await pipeline.optimizer.post(f"/v1/jobs/{job_id}/cancel")

    assert cancelled.status_code == 202
    assert cancelled.json()["cancel_requested"] is True
    outcome = (await await_events(bus, "slmops.optimization.*.v1", count=2, timeout_s=60))[-1]
    assert outcome.type == "slmops.optimization.failed.v1"
    assert outcome.data.reason == "cancelled on request"
    await _wait_state(pipeline, job_id, "cancelled")
    assert (await pipeline.registry.get(f"/v1/variants/{job_id}")).status_code == 404


@pytest.mark.parametrize(
    "optimizer_overrides", [{"profiles_dir": Path(__file__).parent / "profiles-demanding"}]
)
async def test_the_search_refines_a_candidate_below_the_floor_and_keeps_the_trail(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    await pipeline.publish(tiny_onnx(), model_name="tiny", format="onnx", task="feature-extraction")

    _planned, done = await _outcomes(bus, jobs=1, timeout_s=120)

    assert done[0].type == "slmops.optimization.completed.v1", done[0].data
    manifest = (await pipeline.registry.get(f"/v1/variants/{done[0].data.variant_id}")).json()
    trail = manifest["manifest"]["details"]["search_trail"]
    assert trail[0]["change"] == "as planned"
    assert trail[0]["meets_floor"] is False  # per-tensor INT8 is far from lossless
    assert trail[0]["quality"] < 0.99999
    assert 2 <= len(trail) <= 3  # the class allows three tries
    assert all(t["floor"] == 0.99999 for t in trail)
    # the search stopped at the first refinement that met the floor, and stored that one
    assert [t["meets_floor"] for t in trail] == [False] * (len(trail) - 1) + [True]
    configs = [t["recipe"]["passes"][1]["config"] for t in trail]
    assert len({str(c) for c in configs}) == len(trail)  # every attempt a different config
    metrics = manifest["manifest"]["metrics"]
    assert metrics["quality_floor_met"] == 1.0
    assert metrics["quick_cosine_mean"] == pytest.approx(trail[-1]["quality"], abs=1e-6)
    assert manifest["manifest"]["details"]["effective_recipe"] == trail[-1]["recipe"]


async def test_an_onnx_model_with_external_data_passes_through(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path,
    pack: Callable[[Path], bytes],
) -> None:  # fmt: skip
    folder = tmp_path / "external"
    folder.mkdir()
    model = onnx.load_from_string(tiny_onnx())
    onnx.save(
        model, str(folder / "tiny.onnx"), save_as_external_data=True,
        location="tiny.onnx.data", size_threshold=0,
    )  # fmt: skip
    assert (folder / "tiny.onnx.data").stat().st_size > 100_000  # the weights live outside

    await pipeline.publish(pack(folder), model_name="ext", format="onnx", task="feature-extraction")
    _planned, done = await _outcomes(bus, jobs=1, timeout_s=120)

    assert done[0].type == "slmops.optimization.completed.v1", done[0].data
    variant = tmp_path / "variant.onnx"
    _store().get_to_file(done[0].data.artifact.digest, variant)
    loaded = onnx.load(str(variant))  # one self-contained file: no external data left
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in loaded.graph.initializer)
