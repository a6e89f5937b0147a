"""An encoder's embedding output at publish time: the graph's declared outputs read from the
protobuf wire format (no onnx package, no weights loaded), checked with the SDK's rule, the
publisher's hints recorded in the signed manifest and passed on in ``model.published``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest

from slmops.bus import Bus
from slmops.events import ModelPublished
from slmops.testing.events import await_events
from slmops_registry.formats import ArtifactFormatError, GraphOutput, inspect_artifact
from slmops_registry.testing import RegistryUnderTest, gguf_bytes

# --- a tiny protobuf / ONNX encoder (field numbers from onnx.proto) --------------------------

Dim = int | str | None


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 on the wire: two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def vfield(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def bfield(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def output(name: str, elem_type: int | None = 1, dims: list[Dim] | None = None) -> bytes:
    """GraphProto.output: ValueInfoProto {name, TypeProto {tensor_type {elem_type, shape}}}."""
    if elem_type is None:  # a sequence type: not a tensor
        return bfield(12, bfield(1, name) + bfield(2, bfield(4, b"")))
    tensor_type = vfield(1, elem_type)
    if dims is not None:
        shape = b"".join(
            bfield(1, vfield(1, d) if isinstance(d, int) else bfield(2, d) if d else b"")
            for d in dims
        )
        tensor_type += bfield(2, shape)
    return bfield(12, bfield(1, name) + bfield(2, bfield(1, tensor_type)))


def onnx_model(*outputs: bytes) -> bytes:
    """ModelProto with an Identity node, a 16-byte initializer and the given outputs."""
    node = bfield(1, "w") + bfield(2, "y") + bfield(4, "Identity")
    weights = vfield(1, 4) + vfield(2, 1) + bfield(8, "w") + bfield(9, b"\0" * 16)
    graph = bfield(1, node) + bfield(2, "g") + bfield(5, weights) + b"".join(outputs)
    return vfield(1, 8) + bfield(7, graph) + bfield(8, bfield(1, "") + vfield(2, 17))


TOKENS = ["batch", "sequence", 32]
AMBIGUOUS = onnx_model(output("hidden_a", 1, TOKENS), output("hidden_b", 1, TOKENS))
SENTENCE_TRANSFORMERS = onnx_model(
    output("sentence_embedding", 1, ["batch", 32]),
    output("token_embeddings", 1, TOKENS),
)


# --- reading the outputs --------------------------------------------------------------------


def test_declared_outputs_are_read_from_a_file_and_a_tar(tmp_path: Path) -> None:
    data = onnx_model(
        output("sentence_embedding", 1, ["batch", 384]),
        output("token_embeddings", 10, ["batch", "sequence", None]),
        output("ids", 7),
        output("steps", None),
        output("odd", 1, [-1]),
    )
    expected = [
        GraphOutput("sentence_embedding", 1, ("batch", 384)),
        GraphOutput("token_embeddings", 10, ("batch", "sequence", None)),
        GraphOutput("ids", 7, None),
        GraphOutput("steps", None, None),
        GraphOutput("odd", 1, (-1,)),
    ]
    single = tmp_path / "model.onnx"
    single.write_bytes(data)
    tarred = tmp_path / "model.tar"
    with tarfile.open(tarred, "w") as tf:
        info = tarfile.TarInfo("model/model.onnx")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    assert inspect_artifact(single, "onnx").onnx_outputs == expected
    assert inspect_artifact(tarred, "onnx").onnx_outputs == expected


def test_an_over_long_output_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_model(output("x" * 5000, 1, TOKENS)))

    with pytest.raises(ArtifactFormatError, match="an output name is longer than 4096 bytes"):
        inspect_artifact(path, "onnx")


# --- publishing (real NATS and moto S3) ------------------------------------------------------


async def _publish(registry: RegistryUnderTest, data: bytes, **fields: object) -> dict[str, object]:
    digest = (await registry.upload(data)).json()["digest"]
    response = await registry.publish(
        digest, format="onnx", task="feature-extraction", model_name="enc", **fields
    )
    return {"status": response.status_code, "body": response.json()}


@pytest.mark.integration
async def test_an_ambiguous_encoder_is_refused_naming_its_outputs_and_the_flags(
    registry: RegistryUnderTest,
) -> None:
    refused = await _publish(registry, AMBIGUOUS)

    assert refused["status"] == 422
    detail = str(refused["body"]["detail"])  # type: ignore[index]
    assert detail.startswith("embedding output: the model has 2 outputs")
    assert "hidden_a (batch, sequence, 32) float; hidden_b (batch, sequence, 32) float" in detail
    assert "slmops publish --output NAME" in detail
    assert (await registry.client.get("/v1/models")).json() == []


@pytest.mark.parametrize(
    ("hints", "expected"),
    [
        ({"embedding_output": "pooled"}, "no output named 'pooled'"),
        ({"embedding_output": "sentence_embedding", "pooling": "mean"}, "--pooling mean needs"),
        ({"pooling": "max"}, "pooling"),  # not a pooling: the request's own validation
    ],
    ids=["missing-output", "mean-on-pooled", "unknown-pooling"],
)
@pytest.mark.integration
async def test_hints_that_do_not_fit_the_graph_are_refused(
    registry: RegistryUnderTest, hints: dict[str, str], expected: str
) -> None:
    refused = await _publish(registry, SENTENCE_TRANSFORMERS, **hints)

    assert refused["status"] == 422
    assert expected in str(refused["body"]["detail"])  # type: ignore[index]


@pytest.mark.integration
async def test_hints_are_signed_into_the_manifest_and_passed_on(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    hints = {"embedding_output": "hidden_b", "pooling": "cls"}

    first = await _publish(registry, AMBIGUOUS, **hints)
    again = await _publish(registry, AMBIGUOUS, **hints)
    other = await _publish(registry, AMBIGUOUS, embedding_output="hidden_a")
    (event,) = await await_events(bus, ModelPublished.event_type, count=1)

    assert (first["status"], again["status"], other["status"]) == (201, 200, 409)
    assert first["body"]["manifest"]["details"] == hints  # type: ignore[index]
    assert (event.data.embedding_output, event.data.pooling) == ("hidden_b", "cls")


@pytest.mark.integration
async def test_an_unambiguous_encoder_needs_no_hint_and_records_none(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    published = await _publish(registry, SENTENCE_TRANSFORMERS)
    (event,) = await await_events(bus, ModelPublished.event_type, count=1)

    assert published["status"] == 201
    assert published["body"]["manifest"]["details"] == {}  # type: ignore[index]
    assert (event.data.embedding_output, event.data.pooling) == (None, None)


@pytest.mark.integration
async def test_hints_on_a_hugging_face_folder_are_checked_against_its_export(
    registry: RegistryUnderTest,
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in {"config.json": b"{}", "model.safetensors": b"\0" * 64}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    digest = (await registry.upload(buffer.getvalue())).json()["digest"]

    async def publish(version: str, **hints: str) -> httpx.Response:
        return await registry.publish(digest, format="hf-safetensors", task="feature-extraction",
                                      model_name="hf", version=version, **hints)  # fmt: skip

    cls = await publish("1", pooling="cls")
    pooled = await publish("2", pooling="none")

    assert cls.status_code == 201, cls.text
    assert pooled.status_code == 422
    assert "last_hidden_state (batch, sequence, ?) float" in pooled.json()["detail"]


@pytest.mark.integration
async def test_hints_on_another_task_are_refused(registry: RegistryUnderTest) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]

    response = await registry.publish(digest, pooling="mean")

    assert response.status_code == 422
    assert "a text-generation model has none: leave them out" in response.json()["detail"]
