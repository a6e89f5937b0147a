"""Every architecture small models ship in, through the platform's real decoder path.

For each tiny GGUF (``tiny_archs.py``: llama, llama3 (rope scaling as ``rope_freqs``),
mistral, qwen2, qwen3, gemma2, gemma3, phi3, written as llama.cpp writes them): transformers'
GGUF loader gives back the model the file holds; onnxruntime-genai's builder makes a generation
graph whose logits over whole windows (empty past) are torch's; the stamped file generates
torch's greedy tokens through :class:`~slmops.generation.DecoderEngine`; its chat template
renders; ``gguf_blocks`` maps the file's own blocks into the graph. Files transformers would
silently load as another model (rope scaling it does not read and the loader cannot give back)
are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops_optimizer.passes import OnnxModel, PassContext, PassError, SourceModel

pytestmark = pytest.mark.slow

#: transformers class each file loads as: llama.cpp writes Mistral as ``llama`` (the two are
#: one architecture without a sliding window), so it comes back as a Llama.
LOADS_AS = {
    "llama": "LlamaForCausalLM",
    "llama3": "LlamaForCausalLM",
    "mistral": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
#: Config fields that decide the computation, compared between the written and the loaded model.
SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "sliding_window",
    "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "rope_parameters", "max_position_embeddings",
)  # fmt: skip
GENERATION_MAX_RELATIVE_ERROR = 1e-4  # the brief's bound; the builder graphs reach ~1e-6


def _windows(vocab: int, lengths: tuple[int, ...] = (24, 17)) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded windows of token ids (longer than the gemma tiny's sliding window of 8) and
    their attention mask, as the optimizer's sample windows are."""
    rng = np.random.default_rng(11)
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(0, vocab, length)
        mask[row, :length] = 1
    return ids, mask


def _torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False
        )
    return np.asarray(out.logits.numpy())


def _relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    scale = float(np.abs(expected[keep]).max()) or 1.0
    return float(np.abs(actual[keep] - expected[keep]).max()) / scale


def _run_graph(path: Path, spec: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The graph over whole windows in a plain ONNX Runtime session (empty past; every
    position's logits, as the optimizer and validator score)."""
    import onnxruntime as ort

    from slmops.generation.windows import window_session

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = window_session(path, options, ["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": mask, **spec.empty_past(ids.shape[0])}
    names = {i.name for i in session.get_inputs()}
    assert names <= set(feed), f"inputs the test does not feed: {sorted(names - set(feed))}"
    return np.asarray(session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0])


# -- the writer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_writer_round_trips_through_gguf_dequantize(
    tiny_archs: Any, ggml_type: str
) -> None:
    """The hand-written K-quant bytes decode, with the ``gguf`` package's own dequantizer, to
    the input within one quantization step of each sub-block: a wrong layout (nibble order,
    scale packing, high bits) would put values in the wrong places, far beyond a step."""
    import gguf

    rng = np.random.default_rng(5)
    values = (0.1 * rng.standard_normal((6, 512))).astype(np.float32)
    values[0, :256] = np.linspace(-0.3, 0.5, 256)  # a ramp: every position distinct
    raw = tiny_archs.quantize_k(values, ggml_type)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    assert raw.dtype == np.uint8
    assert raw.shape == (6, 512 // block * size)
    back = tiny_archs.dequantize(raw, ggml_type, values.shape)

    sub = 16 if ggml_type == "Q6_K" else 32
    blocks, errors = values.reshape(-1, sub), np.abs(back - values).reshape(-1, sub)
    if ggml_type == "Q6_K":
        step = np.abs(blocks).max(axis=1) / 31
    else:
        levels = 15 if ggml_type == "Q4_K" else 31
        step = (np.maximum(blocks.max(axis=1), 0) - np.minimum(blocks.min(axis=1), 0)) / levels
    # half a step, plus what the 6-bit (8-bit) sub-block scales and mins round off: at most
    # half the super-block's largest step
    largest = step.reshape(-1, 256 // sub).max(axis=1).repeat(256 // sub)
    assert (errors.max(axis=1) <= 0.5 * step + 0.5 * largest + 1e-6).all()
    assert float(errors.mean()) < 0.35 * float(step.mean())  # round to nearest, not floor


def test_each_file_is_written_as_llama_cpp_writes_it(arch_case: Any) -> None:
    """Tensor names of the architecture's gguf map, its metadata keys, a mix of block types
    with K-quants, the tokenizer with its control tokens and the chat template."""
    import gguf

    tiny = arch_case.tiny()
    reader = gguf.GGUFReader(tiny.path)
    arch = arch_case.spec.gguf_arch
    assert reader.fields["general.architecture"].contents() == arch
    allowed = {
        gguf.TENSOR_NAMES[t].format(bid=b)
        for t in gguf.MODEL_TENSORS[gguf_arch(arch)]
        for b in range(arch_case.spec.layers)
    }
    names = {t.name.removesuffix(".weight").removesuffix(".bias") for t in reader.tensors}
    assert names <= allowed
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert {"F32", "Q8_0", "Q4_0", "Q4_1", "Q5_0"} <= kinds
    assert kinds & {"Q4_K", "Q5_K", "Q6_K"}
    assert f"{arch}.context_length" in reader.fields
    if arch_case.spec.writes_key_length:
        assert f"{arch}.attention.key_length" in reader.fields
    assert reader.fields["tokenizer.chat_template"].contents() == arch_case.spec.chat.template
    chat = arch_case.spec.chat
    assert reader.fields["tokenizer.ggml.model"].contents() == chat.model
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types.count(3) == len(chat.specials) + len([t for t in chat.head if t != chat.unk])


def gguf_arch(name: str) -> Any:
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


# -- transformers' GGUF loader -------------------------------------------------------------------


def test_transformers_loads_the_model_the_file_holds(arch_case: Any) -> None:
    tiny = arch_case.tiny()
    model, tokenizer = arch_case.loaded()
    assert type(model).__name__ == LOADS_AS[arch_case.name]
    written, loaded = tiny.model.config.to_dict(), model.config.to_dict()
    for name in SHAPE_FIELDS:
        assert loaded.get(name) == written.get(name), name
    ids, mask = _windows(len(tiny.vocab.tokens))
    expected = _torch_logits(tiny.model, ids, mask)
    assert _relative_error(_torch_logits(model, ids, mask), expected, mask) < 1e-5
    assert tokenizer.convert_tokens_to_ids(arch_case.spec.chat.eos) == tiny.vocab.id(
        arch_case.spec.chat.eos
    )


# -- onnxruntime-genai's builder graph -----------------------------------------------------------


def test_generation_graph_reproduces_torch_over_whole_windows(arch_case: Any) -> None:
    tiny = arch_case.tiny()
    spec = arch_case.generation_spec()
    ids, mask = _windows(len(tiny.vocab.tokens))
    actual = _run_graph(arch_case.generation_file(), spec, ids, mask)
    expected = _torch_logits(tiny.model, ids, mask)
    assert actual.shape == expected.shape
    assert _relative_error(actual, expected, mask) < GENERATION_MAX_RELATIVE_ERROR


def test_stamped_file_generates_torchs_greedy_tokens(arch_case: Any) -> None:
    """DecoderEngine (the runtime's own loop and KV cache) against ``generate(do_sample=False)``,
    token by token until the first step where torch's top two logits are within float noise
    of each other (a tie the two implementations may break either way)."""
    import torch

    from slmops.generation import DecoderEngine

    tiny = arch_case.tiny()
    engine = DecoderEngine.load(arch_case.generation_file(), arch_case.root / "runtime", threads=2)
    judged = 0
    for offset in range(3):
        prompt = [(37 * i + 11 * offset + 3) % 280 for i in range(12)]
        with torch.no_grad():
            out = tiny.model.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                pad_token_id=tiny.vocab.id(arch_case.spec.chat.pad), output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        expected = out.sequences[0, len(prompt) :].tolist()
        margins = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
        decided = next((i for i, m in enumerate(margins) if m < 1e-3), len(margins))
        stop = next((i for i, t in enumerate(expected) if t in engine.stop_ids), len(expected))
        got = engine.greedy(prompt, 16)
        n = min(decided, stop)
        assert got[:n] == expected[:n], (prompt, got, expected, margins)
        judged += n
    assert judged >= 24  # most steps are decided: the comparison is not vacuous


def test_chat_template_renders_with_the_models_control_tokens(arch_case: Any) -> None:
    from slmops.generation import Codec, render_chat
    from slmops.generation.spec import TOKENIZER_KEY
    from slmops.onnxmeta import read_metadata

    chat = arch_case.spec.chat
    spec = arch_case.generation_spec()
    assert spec.chat_template == chat.template
    assert spec.special_tokens["eos_token"] == chat.eos
    prompt = render_chat([{"role": "user", "content": "Hello there"}], spec.chat_template,
                         spec.special_tokens)  # fmt: skip
    assert prompt.template == "model"
    for marker in chat.markers:
        assert marker in prompt.text
    codec = Codec(read_metadata(arch_case.generation_file())[TOKENIZER_KEY])
    ids = codec.encode(prompt.text, add_special_tokens=False)
    vocab = arch_case.tiny().vocab
    for token in (*chat.head, *chat.specials):  # every control token in the prompt is one id
        if token in prompt.text:
            assert vocab.id(token) in ids, token
    assert vocab.id(chat.eos) in spec.stop_token_ids
    # the stamped tokenizer is the one the GGUF file describes (what the job scored with)
    _, tokenizer = arch_case.loaded()
    text = "The quick brown fox jumps over the lazy dog, twice."
    assert codec.encode(text, add_special_tokens=False) == tokenizer.encode(
        text, add_special_tokens=False
    )
    assert codec.decode(codec.encode(text, add_special_tokens=False)) == text


# -- gguf_blocks on the builder graph ------------------------------------------------------------


def test_gguf_blocks_maps_the_files_blocks_into_the_graph(arch_case: Any, tmp_path: Path) -> None:
    """Every quantized tensor of the file is mapped exactly and no weight stays fp32: phi3's
    fused ``ffn_up``, which the builder splits into gate and up MatMuls, as two row ranges."""
    from slmops_optimizer.passes.gguf_blocks import GgufBlocks

    tiny = arch_case.tiny()
    source = SourceModel("gguf", tiny.path, "text-generation", "sha256:tiny")
    ctx = PassContext(work_dir=tmp_path, source=source, intra_op_threads=2)
    out = GgufBlocks.from_config({}).run(OnnxModel(arch_case.built_graph()), ctx)
    ids, mask = _windows(len(tiny.vocab.tokens))
    actual = _run_graph(out.path, arch_case.generation_spec(), ids, mask)
    expected = _torch_logits(tiny.model, ids, mask)
    assert _relative_error(actual, expected, mask) < GENERATION_MAX_RELATIVE_ERROR
    entries = {e["tensor"] for e in ctx.details["tensor_map"]}
    assert ctx.metrics["fp32_weights"] == 0, ctx.log
    assert entries == {n for n, kind in tiny.types.items() if kind != "F32"}
    assert ctx.metrics["mapped_tensors"] == len(entries)
    assert all(e["form"] != "rtn" for e in ctx.details["tensor_map"])


# -- Llama 3 rope scaling -----------------------------------------------------------------------


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(
    arch_cases: Any, tiny_archs: Any, tmp_path: Path
) -> None:
    """llama.cpp writes Llama 3 rope scaling only as the ``rope_freqs`` factors; the loader
    recovers the exact llama3 parameters from them (a set it has to fit), and the builder's
    graph - also with its context capped below the original 8192 - rotates like torch.

    The same weights with plain rope give logits far outside every tolerance the llama3 case
    is held to, so a loader or graph that dropped the scaling would fail those tests."""
    import copy

    import gguf
    import torch
    import transformers

    from slmops_optimizer.generation.build import build_decoder

    case = arch_cases("llama3")
    tiny = case.tiny()
    reader = gguf.GGUFReader(tiny.path)
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}
    assert not [key for key in reader.fields if key.startswith("llama.rope.scaling.")]
    model, _ = case.loaded()
    assert model.config.rope_parameters == tiny_archs.LLAMA3_ROPE

    plain_config = copy.deepcopy(tiny.model.config)
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    plain = transformers.AutoModelForCausalLM.from_config(
        plain_config, attn_implementation="eager", dtype=torch.float32
    )
    plain.load_state_dict(tiny.model.state_dict())
    plain.tie_weights()
    plain.eval()
    ids, mask = _windows(len(tiny.vocab.tokens))
    expected = _torch_logits(tiny.model, ids, mask)
    assert _relative_error(_torch_logits(plain, ids, mask), expected, mask) > 0.01

    capped = build_decoder(
        case.hf_dir(), tmp_path / "capped", tmp_path / "cache", max_context_tokens=64
    )
    actual = _run_graph(capped, case.generation_spec(), ids, mask)
    assert _relative_error(actual, expected, mask) < GENERATION_MAX_RELATIVE_ERROR
    config = json.loads((capped.parent / "genai_config.json").read_text())
    assert config["model"]["context_length"] == 64


# -- what the platform refuses or repairs --------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "change", "extra", "reason"),
    [
        (
            "llama", {}, {"rope_freqs.weight": np.linspace(1, 32, 32)},
            r"Llama 3 rope scaling \(rope_freqs\) whose factors fit no llama3 rope parameters",
        ),
        (
            "phi3",
            {"max_position_embeddings": 131072},
            {"rope_factors_long.weight": np.linspace(1, 30, 32),
             "rope_factors_short.weight": np.linspace(1, 2, 32)},
            "LongRoPE factors",
        ),
        ("gemma3", {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}, {},
         "linear rope scaling"),
    ],
    ids=["rope-freqs-fitting-no-llama3", "phi3-longrope", "gemma3-linear-rope"],
)  # fmt: skip
def test_rope_scaling_transformers_would_drop_is_refused(
    tiny_archs: Any, tmp_path: Path, arch: str, change: dict[str, Any],
    extra: dict[str, np.ndarray], reason: str,
) -> None:  # fmt: skip
    """transformers' GGUF loader reads no rope scaling (tensors nor keys) and would build a
    plain-rope model; the export check compares against that same model, so only the loader
    can notice: it refuses the file, naming what it would drop - unless it can give the scaling
    back (``rope_freqs`` factors that fit llama3 parameters, see the llama3 case)."""
    from slmops_optimizer.gguf.loader import load_gguf_causal_lm

    spec = tiny_archs.ARCHS[arch]
    metadata = {k: v for k, v in change.items() if "." in k}
    config = {k: v for k, v in change.items() if "." not in k}
    spec = dataclasses.replace(
        spec, config={**spec.config, **config}, extra_metadata={**spec.extra_metadata, **metadata}
    )
    tiny = tiny_archs.write_tiny_gguf(spec, tmp_path / f"{arch}.gguf", extra_tensors=extra)
    with pytest.raises(PassError, match=f"uses {reason}.*transformers' GGUF loader ignores"):
        load_gguf_causal_lm(tiny.path, tmp_path)


def test_qwen3_head_size_is_read_from_key_length(tiny_archs: Any, tmp_path: Path) -> None:
    """transformers does not map ``qwen3.attention.key_length`` (its Qwen3Config defaults to
    128); the loader passes it on, so a Qwen3 with another head size loads."""
    from slmops_optimizer.gguf.loader import load_gguf_causal_lm

    spec = tiny_archs.ARCHS["qwen3"]
    spec = dataclasses.replace(spec, config={**spec.config, "head_dim": 64})
    tiny = tiny_archs.write_tiny_gguf(spec, tmp_path / "qwen3-h64.gguf")
    model, _ = load_gguf_causal_lm(tiny.path, tmp_path)
    assert model.config.head_dim == 64
    ids, mask = _windows(len(tiny.vocab.tokens))
    expected = _torch_logits(tiny.model, ids, mask)
    assert _relative_error(_torch_logits(model, ids, mask), expected, mask) < 1e-5


def test_phi3_with_a_context_other_than_4096_builds(tiny_archs: Any, tmp_path: Path) -> None:
    """transformers leaves Phi3Config's ``original_max_position_embeddings`` at 4096 and the
    builder took any other context for LongRoPE (failing on ``'multi_cache'``); ``_fix_config``
    aligns the two for a model without rope scaling."""
    from slmops_optimizer.generation.metadata import write_generation_file
    from slmops_optimizer.gguf.loader import save_gguf_as_hf

    spec = tiny_archs.ARCHS["phi3"]
    spec = dataclasses.replace(
        spec, config={**spec.config, "max_position_embeddings": 2048},
        extra_metadata={"rope.scaling.original_context_length": 2048},
    )  # fmt: skip
    tiny = tiny_archs.write_tiny_gguf(spec, tmp_path / "phi3-2k.gguf")
    hf = save_gguf_as_hf(tiny.path, tmp_path / "hf", tmp_path)
    assert json.loads((hf / "config.json").read_text())["original_max_position_embeddings"] == 4096
    out = write_generation_file(hf, tmp_path / "generation.onnx", tmp_path)
    from slmops.generation import GenerationSpec
    from slmops.onnxmeta import read_metadata

    generation = GenerationSpec.from_metadata(read_metadata(out))
    assert generation is not None
    assert generation.context_length == 2048
    ids, mask = _windows(len(tiny.vocab.tokens))
    actual = _run_graph(out, generation, ids, mask)
    assert _relative_error(actual, _torch_logits(tiny.model, ids, mask), mask) < 1e-4
