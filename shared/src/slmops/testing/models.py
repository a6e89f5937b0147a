"""Tiny real models for tests: ONNX built in memory, run by ONNX Runtime in milliseconds, and a
tiny llama GGUF for the generation paths."""

from __future__ import annotations

from pathlib import Path


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


def write_tiny_llama_gguf(
    path: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
    seed: int, template: str | None = None,
) -> Path:  # fmt: skip
    """A tiny llama (byte-level BPE of 256 tokens, context 128) as GGUF. Its weights are F32 and
    its head untied, so its continuations vary with the prompt and the seed (a tied random head
    repeats the last token)."""
    import gguf
    import numpy as np

    vocab = 256
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    symbols = byte_level_symbols()
    th = symbols[ord("t")] + symbols[ord("h")]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([symbols[b] for b in range(vocab - 1)] + [th])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges([f"{symbols[ord('t')]} {symbols[ord('h')]}"])  # "t h" -> the last
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if template:
        writer.add_chat_template(template)
    head = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, hidden),
                                          "output_norm.weight": (hidden,),
                                          "output.weight": (vocab, hidden)}  # fmt: skip
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }  # fmt: skip
    for name, shape in shapes.items():
        scale = 1.0 if name == "token_embd.weight" else 0.3
        values = np.ones(shape) if len(shape) == 1 else scale * rng.standard_normal(shape)
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
