"""Tiny real ONNX models for tests: built in memory, run by ONNX Runtime in milliseconds."""

from __future__ import annotations


def tiny_encoder_onnx(
    *, op_domain: str = "", hidden: int = 64, vocab: int = 512, seed: int = 7
) -> bytes:
    """An encoder-shaped graph (Gather → MatMul → Relu → MatMul → last_hidden_state).

    ``op_domain`` puts the Relu in a custom domain ONNX Runtime has no kernel for.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype("float32"), "emb"),
        numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype("float32"), "w1"),
        numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype("float32"), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="/layers.0/fc1/MatMul"),
        helper.make_node("Relu", ["h"], ["r"], name="act", domain=op_domain),
        helper.make_node("MatMul", ["r", "w2"], ["last_hidden_state"], name="/layers.1/fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", hidden])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17)]
    if op_domain:
        opsets.append(helper.make_opsetid(op_domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return bytes(model.SerializeToString())


def with_word_tokenizer(data: bytes, *, max_length: int | None = None, words: int = 500) -> bytes:
    """The model with a word-level tokenizer over ``w0 .. w{words-1}`` stamped in its metadata
    (``slmops.tokenizer``), as the optimizer stamps a real one."""
    import onnx
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(words)} | {"[UNK]": words}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))  # noqa: S106 - a token
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = onnx.load_from_string(data)
    model.metadata_props.add(key="slmops.tokenizer", value=tokenizer.to_str())
    if max_length is not None:
        model.metadata_props.add(key="slmops.max_length", value=str(max_length))
    return bytes(model.SerializeToString())


def byte_level_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet byte-level BPE vocabularies
    spell their tokens in (for tests that write tiny tokenizers, e.g. into GGUF files)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + extra)
    return mapping
