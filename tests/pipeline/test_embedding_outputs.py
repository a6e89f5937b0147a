"""Encoders with several outputs: the embedding output is chosen by shape and name (or named by
the publisher), scored and judged on it, stamped into the variant; an ambiguous encoder is
refused at publish with the reason (real NATS, moto S3, torch exports, ONNX Runtime)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from slmops.bus import Bus
from slmops.events import ModelPublished, new_event
from slmops.events.payloads import ArtifactRef
from slmops.objectstore import ObjectStore
from slmops.settings import PlatformSettings
from slmops.testing.events import await_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Export = Callable[..., bytes]


def _export(module: Any, inputs: list[str], outputs: dict[str, dict[int, str]], out: Path) -> bytes:
    """``module`` (forward over ``inputs``) as ONNX with ``outputs`` in this order, as the
    TorchScript exporter writes them (opset 17, batch and sequence dynamic)."""
    import torch

    ids = torch.randint(5, 100, (2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # with padding: an all-ones mask lets transformers trace a no-mask path
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    dynamic = {name: {0: "batch", 1: "sequence"} for name in inputs} | outputs
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            tuple(feeds[name] for name in inputs),
            str(out),
            dynamo=False,
            opset_version=17,
            input_names=inputs,
            output_names=list(outputs),
            dynamic_axes=dynamic,
        )
    return out.read_bytes()


@pytest.fixture(scope="session")
def minilm_sentence_transformers(
    minilm_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    """all-MiniLM-L6-v2 as a sentence-transformers export: ``sentence_embedding`` (batch,
    hidden: mean-pooled and normalised) first, ``pooler_output`` (batch, hidden), then
    ``token_embeddings`` (batch, seq, hidden); its tokenizer stamped in the metadata."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        minilm_folder, local_files_only=True, attn_implementation="eager", dtype="float32"
    )

    class SentenceTransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            tokens = out.last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            sentence = torch.nn.functional.normalize(mean, p=2.0, dim=1)
            return sentence, out.pooler_output, tokens

    outputs = {
        "sentence_embedding": {0: "batch"},
        "pooler_output": {0: "batch"},
        "token_embeddings": {0: "batch", 1: "sequence"},
    }
    folder = tmp_path_factory.mktemp("minilm-st")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    data = _export(SentenceTransformer(), names, outputs, folder / "model.onnx")
    proto = onnx.load_from_string(data)
    tokenizer = (minilm_folder / "tokenizer.json").read_text()
    proto.metadata_props.add(key="slmops.tokenizer", value=tokenizer)
    proto.metadata_props.add(key="slmops.max_length", value="256")
    return bytes(proto.SerializeToString())


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Random-weight encoders of two other architectures, from transformers configs:

    - ``distilbert``: a (batch, hidden) first-token vector *first*, ``last_hidden_state`` second
      (no token_type_ids input, no pooler);
    - ``ambiguous``: a BERT whose two outputs are unrelated (batch, seq, hidden) tensors with
      no known name: the last layer and the first layer's hidden states.
    """
    import torch
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-encoders")
    distil = DistilBertModel(
        DistilBertConfig(vocab_size=1000, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                         max_position_embeddings=128, attn_implementation="eager")
    )  # fmt: skip
    bert = BertModel(
        BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128,
                   attn_implementation="eager")
    )  # fmt: skip

    class FirstTokenFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = distil

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]
            return hidden[:, 0], hidden

    class TwoHiddenStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids, output_hidden_states=True)  # fmt: skip
            return out.last_hidden_state, out.hidden_states[1]

    tokens = {0: "batch", 1: "sequence"}
    return {
        "distilbert": _export(
            FirstTokenFirst(), ["input_ids", "attention_mask"],
            {"cls_vector": {0: "batch"}, "last_hidden_state": tokens}, folder / "distil.onnx",
        ),
        "ambiguous": _export(
            TwoHiddenStates(), ["input_ids", "attention_mask", "token_type_ids"],
            {"hidden_a": tokens, "hidden_b": tokens}, folder / "bert.onnx",
        ),
    }  # fmt: skip


def _metadata(digest: str, tmp_path: Path) -> dict[str, str]:
    local = tmp_path / f"{digest.removeprefix('sha256:')[:12]}.onnx"
    ObjectStore.from_settings(PlatformSettings()).get_to_file(digest, local)
    return {p.key: p.value for p in onnx.load(str(local), load_external_data=False).metadata_props}


async def _try_publish(pipeline: Any, data: bytes, **fields: Any) -> Any:
    uploaded = await pipeline.registry.post("/v1/blobs", content=data)
    assert uploaded.status_code == 201, uploaded.text
    body = {"version": "1.0.0", "format": "onnx", "task": "feature-extraction",
            "device_classes": ["test-cpu"], "artifact_digest": uploaded.json()["digest"],
            **fields}  # fmt: skip
    return await pipeline.registry.post("/v1/models", json=body)


async def test_a_sentence_transformers_export_is_optimized_and_judged_on_its_sentence_embedding(
    pipeline: Any, validator: Any, bus: Bus, minilm_sentence_transformers: bytes, tmp_path: Path
) -> None:
    # setup / execute: MiniLM with its pooled output first, token embeddings third
    await pipeline.publish(
        minilm_sentence_transformers, model_name="minilm-st", format="onnx",
        task="feature-extraction", device_classes=["test-cpu"],
    )  # fmt: skip
    outcomes = await await_events(bus, "slmops.validation.*.v1", count=1, timeout_s=420)
    completed = (await await_events(bus, "slmops.optimization.completed.v1", count=1))[0]

    # assert: the job got a variant (no broadcasting crash), scored on sentence_embedding
    manifest = (await pipeline.registry.get(f"/v1/variants/{completed.data.variant_id}")).json()
    log = manifest["manifest"]["details"]["pass_log"]
    assert any("embeddings: output 'sentence_embedding', pooling none" in line for line in log)
    trail = manifest["manifest"]["details"]["search_trail"]
    assert trail[0]["quality_metric"] == "cosine_mean"
    assert 0.9 < trail[-1]["quality"] <= 1.0 + 1e-6
    # the choice travels in the artifact, every output kept by the quantizer
    props = _metadata(completed.data.artifact.digest, tmp_path)
    assert props["slmops.embedding_output"] == "sentence_embedding"
    assert props["slmops.pooling"] == "none"
    local = next(tmp_path.glob("*.onnx"))
    outputs = [o.name for o in onnx.load(str(local), load_external_data=False).graph.output]
    assert outputs == ["sentence_embedding", "pooler_output", "token_embeddings"]

    # the validator judged it with cosine parity on the same output, on real texts
    (outcome,) = outcomes
    assert outcome.type == "slmops.validation.passed.v1", outcome.data
    gates = {g.name: g for g in outcome.data.gates}
    assert gates["parity.cosine_mean"].value > 0.98
    assert "the model's own embeddings ('sentence_embedding') of 96 texts" in (
        gates["parity.cosine_mean"].detail
    )
    assert gates["parity.output_shape_mismatches"].value == 0


async def test_the_choice_is_by_shape_and_name_and_ambiguous_encoders_are_refused(
    pipeline: Any, bus: Bus, tiny_encoders: dict[str, bytes], tmp_path: Path
) -> None:
    # a DistilBERT whose first output is a pooled vector: last_hidden_state is chosen by name
    await pipeline.publish(
        tiny_encoders["distilbert"], model_name="distil", format="onnx",
        task="feature-extraction", device_classes=["test-cpu"],
    )  # fmt: skip

    # two unrelated token-embedding outputs and no hint: refused, naming both and the flags
    ambiguous = await _try_publish(pipeline, tiny_encoders["ambiguous"], model_name="amb")
    assert ambiguous.status_code == 422, ambiguous.text
    reason = ambiguous.json()["detail"]
    assert "hidden_a (batch, sequence, 32) float" in reason
    assert "hidden_b (batch, sequence, 32) float" in reason
    assert "--output NAME" in reason

    # a hint naming an output the graph does not have: refused too
    missing = await _try_publish(
        pipeline, tiny_encoders["ambiguous"], model_name="amb", embedding_output="pooled"
    )
    assert missing.status_code == 422, missing.text
    assert "no output named 'pooled'" in missing.json()["detail"]

    # named by the publisher: accepted, recorded in the signed manifest, used by the optimizer
    named = await _try_publish(
        pipeline, tiny_encoders["ambiguous"], model_name="amb", embedding_output="hidden_b",
        pooling="cls",
    )  # fmt: skip
    assert named.status_code == 201, named.text
    assert named.json()["manifest"]["details"] == {"embedding_output": "hidden_b", "pooling": "cls"}

    def outcome(event: Any) -> bool:
        return bool(event.type != "slmops.optimization.planned.v1")

    done = await await_events(
        bus, "slmops.optimization.*.v1", count=2, timeout_s=240, where=outcome
    )
    by_model = {e.data.model_name: e for e in done}
    assert {e.type for e in done} == {"slmops.optimization.completed.v1"}, [e.data for e in done]
    published = await await_events(bus, "slmops.model.published.v1", count=2)
    hinted = next(e for e in published if e.data.model_name == "amb")
    assert (hinted.data.embedding_output, hinted.data.pooling) == ("hidden_b", "cls")
    distil = _metadata(by_model["distil"].data.artifact.digest, tmp_path)
    assert (distil["slmops.embedding_output"], distil["slmops.pooling"]) == (
        "last_hidden_state", "mean",
    )  # fmt: skip
    amb = _metadata(by_model["amb"].data.artifact.digest, tmp_path)
    assert (amb["slmops.embedding_output"], amb["slmops.pooling"]) == ("hidden_b", "cls")

    # a foreign producer announcing the ambiguous model without a hint: model.rejected
    uploaded = await pipeline.registry.post("/v1/blobs", content=tiny_encoders["ambiguous"])
    blob = uploaded.json()
    announced = ModelPublished(
        model_name="amb-upstream", version="1.0.0", format="onnx", task="feature-extraction",
        artifact=ArtifactRef(digest=blob["digest"], size_bytes=blob["size_bytes"], uri=blob["uri"]),
    )  # fmt: skip
    await bus.publish(new_event(announced, source="/test/trainer"))
    (rejected,) = await await_events(bus, "slmops.model.rejected.v1", count=1, timeout_s=30)
    assert rejected.data.model_name == "amb-upstream"
    assert "hidden_a" in rejected.data.reason
    assert "--output NAME" in rejected.data.reason
