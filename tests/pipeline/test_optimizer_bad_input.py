"""Bad models end in ``optimization.failed`` with a reason a person can act on; the service
stays up and no temp file is left behind."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.testing.events import await_events

pytestmark = [pytest.mark.integration]


async def _failure(pipeline: Any, bus: Bus, timeout_s: float = 120) -> str:
    events = await await_events(bus, "slmops.optimization.*.v1", count=2, timeout_s=timeout_s)
    outcome = events[-1]
    assert outcome.type == "slmops.optimization.failed.v1", outcome.data
    ready = await pipeline.optimizer.get("/readyz")
    assert ready.status_code == 200, ready.text  # the service is still up and consuming
    assert pipeline.scratch_files() == []
    job = (await pipeline.optimizer.get(f"/v1/jobs/{outcome.data.variant_id}")).json()
    assert job["state"] == "failed"
    assert job["error"] == outcome.data.reason
    reason: str = outcome.data.reason
    return reason


def _onnx_with_dangling_input() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["nowhere"], ["y"])
    # Declared as token embeddings: the registry's output check passes, the graph is broken.
    declared = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])
    graph = helper.make_graph([node], "broken", [], [declared])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


async def test_corrupt_onnx(pipeline: Any, bus: Bus) -> None:
    await pipeline.publish(
        _onnx_with_dangling_input(), model_name="broken", format="onnx", task="feature-extraction"
    )
    reason = await _failure(pipeline, bus)
    assert "not a valid ONNX model" in reason
    assert "nowhere" in reason


async def test_an_operator_no_runtime_can_run(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    await pipeline.publish(
        tiny_onnx(op_domain="com.example.custom"),
        model_name="custom-op",
        format="onnx",
        task="feature-extraction",
    )
    reason = await _failure(pipeline, bus)
    assert "Relu" in reason
    assert "com.example.custom" in reason


@pytest.mark.parametrize("optimizer_overrides", [{"max_source_size_mb": 0.01}])
async def test_a_model_over_the_size_limit(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    await pipeline.publish(tiny_onnx(), model_name="big", format="onnx", task="feature-extraction")
    reason = await _failure(pipeline, bus)
    assert "over the optimizer's limit of 0.01 MB" in reason
    assert "SLMOPS_OPTIMIZER_MAX_SOURCE_SIZE_MB" in reason


async def test_truncated_safetensors(
    pipeline: Any,
    bus: Bus,
    minilm_folder: Path,
    tmp_path: Path,
    pack: Callable[[Path], bytes],
) -> None:
    folder = tmp_path / "minilm"
    shutil.copytree(minilm_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    await pipeline.publish(
        pack(folder), model_name="truncated", format="hf-safetensors", task="feature-extraction"
    )
    reason = await _failure(pipeline, bus)
    assert "cannot load the Hugging Face model" in reason


async def test_gguf_of_an_unsupported_architecture(pipeline: Any, bus: Bus, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "slmops-test-arch")
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    await pipeline.publish(
        path.read_bytes(), model_name="odd", format="gguf", task="text-generation"
    )
    reason = await _failure(pipeline, bus)
    assert "slmops-test-arch" in reason
    assert "not supported" in reason


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer_overrides", [{"profiles_dir": Path(__file__).parent / "profiles-strict"}]
)
async def test_a_conversion_that_fails_its_output_check(
    pipeline: Any, bus: Bus, minilm_folder: Path, pack: Callable[[Path], bytes]
) -> None:
    await pipeline.publish(
        pack(minilm_folder), model_name="strict", format="hf-safetensors", task="feature-extraction"
    )
    reason = await _failure(pipeline, bus, timeout_s=240)
    assert "does not reproduce the source" in reason
    assert "> 1e-12" in reason
