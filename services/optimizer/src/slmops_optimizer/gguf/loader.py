"""Load a GGUF causal LM into torch (dequantized to float32) together with its tokenizer.

transformers' GGUF loader dequantizes every tensor and un-permutes the llama q/k rows; the model
it returns cannot be saved (``save_pretrained`` fails with "not serializable") and may use an
attention kernel the TorchScript exporter cannot trace, so its weights are copied into a fresh
model built from the same config with eager attention.
"""

from __future__ import annotations

import math
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from slmops_optimizer.gguf.reader import (
    SUPPORTED_ARCHITECTURES,
    read_architecture,
    require_supported,
)
from slmops_optimizer.passes.base import PassError


def load_gguf_causal_lm(path: Path, scratch_dir: Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a float32 ``*ForCausalLM`` in eval mode with ``use_cache=False``
    and eager attention, and the tokenizer stored in the GGUF file.

    The file may sit anywhere, beside anything: it is loaded through a private folder (inside
    ``scratch_dir`` if given, e.g. the job's work dir; removed afterwards) holding only a link to
    it. An architecture outside :data:`SUPPORTED_ARCHITECTURES`, one transformers cannot load,
    or a file it would load as another model (rope scaling it does not read and that cannot be
    given back, see :func:`_config_transformers_misses`) raises :class:`PassError`.
    """
    import torch
    import transformers

    path = Path(path).resolve()
    architecture = read_architecture(path)  # the header only: fails fast on a wrong file
    require_supported(architecture)
    overrides = _config_transformers_misses(path, architecture)
    with tempfile.TemporaryDirectory(prefix="gguf-load-", dir=scratch_dir) as folder:
        link = Path(folder) / "model.gguf"
        try:
            link.symlink_to(path)
        except OSError:  # a file system without symlinks: a hard link, else a copy
            try:
                link.hardlink_to(path)
            except OSError:
                import shutil

                shutil.copyfile(path, link)
        try:
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=link.name, dtype=torch.float32, local_files_only=True,
                **overrides,
            )  # fmt: skip
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                folder, gguf_file=link.name, local_files_only=True
            )
        except ValueError as exc:
            if "not supported" in str(exc) and "architecture" in str(exc):
                raise PassError(
                    f"GGUF architecture {architecture!r} is not supported: supported are "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}"
                ) from exc
            raise PassError(f"transformers cannot load {path.name}: {exc}") from exc
        except Exception as exc:  # transformers raises many types for a broken file
            raise PassError(f"transformers cannot load {path.name}: {exc}") from exc

    config = loaded.config
    config.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation="eager", dtype=torch.float32
    )
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied head appears (or not) in the state dict depending on the class: both are fine.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise PassError(
            f"the weights of {path.name} do not fit a {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded, state
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


#: Tensors llama.cpp writes for rope scaling, which transformers' GGUF loader drops without a
#: word (no parameter of the model takes them): the model it builds rotates with plain rope.
#: ``rope_freqs`` (Llama 3.1/3.2/3.3) is given back as llama3 rope parameters when its factors
#: fit them (:func:`recover_llama3_rope`); LongRoPE factors are refused.
_ROPE_FREQS = "rope_freqs.weight"
_DROPPED_ROPE_TENSORS = {
    "rope_factors_long.weight": "LongRoPE factors (rope_factors_long/short: Phi-3 128k, Phi-3.5, "
    "Phi-4-mini files)",
    "rope_factors_short.weight": "LongRoPE factors (rope_factors_long/short: Phi-3 128k, "
    "Phi-3.5, Phi-4-mini files)",
}


def _config_transformers_misses(path: Path, architecture: str) -> dict[str, Any]:
    """Config values transformers' GGUF loader does not read from the file, as overrides for
    ``from_pretrained``; :class:`PassError` for what cannot be given back this way.

    transformers (5.x) maps a fixed list of metadata keys per architecture and silently drops
    the rest, so a file may load as a different model than the one llama.cpp runs:

    - Llama 3 rope scaling: llama.cpp's converter writes it only as per-frequency factors (the
      ``rope_freqs`` tensor; no ``llama.rope.scaling.*`` key), which transformers never reads.
      The llama3 parameters they were computed from are recovered and passed on as
      ``rope_parameters``, so torch, the builder's graph and llama.cpp rotate alike; factors
      that fit no llama3 parameters are refused.
    - other rope scaling, as tensors (``rope_factors_long/short``) or as
      ``{arch}.rope.scaling.*`` keys (gemma3 4B+ linear, YaRN...): never read, the model
      rotates with plain rope and its logits differ from the file's model at every position.
      The file is refused (the export check compares against that same wrong torch model, so
      nothing downstream would notice).
    - ``qwen3.attention.key_length``: not mapped, the config keeps Qwen3Config's default head
      size 128 (every published Qwen3); any other head size failed with "size mismatch".
    """
    header = _scan_header(path)
    metadata = header.metadata
    tensors = header.tensors
    dropped = sorted({_DROPPED_ROPE_TENSORS[n] for n in tensors if n in _DROPPED_ROPE_TENSORS})
    scaling = str(metadata.get(f"{architecture}.rope.scaling.type", "none")).lower()
    factor = metadata.get(f"{architecture}.rope.scaling.factor", 1.0)
    if scaling not in ("none", "") and factor != 1.0:
        dropped.append(f"{scaling} rope scaling (factor {factor:g})")
    overrides: dict[str, Any] = {}
    if _ROPE_FREQS in tensors:
        rope = _rope_from_freqs(path, header, architecture)
        if rope is None:
            dropped.append(
                "Llama 3 rope scaling (rope_freqs) whose factors fit no llama3 rope parameters"
            )
        elif rope:
            overrides["rope_parameters"] = rope
    if dropped:
        raise PassError(
            f"{path.name} uses {'; '.join(dropped)}, which transformers' GGUF loader ignores: "
            "the converted model would not be the file's model. Publish the Hugging Face "
            "checkpoint instead"
        )
    key_length = metadata.get(f"{architecture}.attention.key_length")
    if architecture == "qwen3" and isinstance(key_length, int) and key_length > 0:
        overrides["head_dim"] = key_length
    return overrides


# -- Llama 3 rope scaling --------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama3Rope:
    """The parameters of llama3 rope scaling (Llama 3.1+): each rotary frequency whose
    wavelength exceeds ``original / low_freq_factor`` is divided by ``factor``, one shorter than
    ``original / high_freq_factor`` is kept, the ones between are interpolated smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def rope_parameters(self, theta: float) -> dict[str, Any]:
        """transformers' ``rope_parameters`` (the builder reads the same dict)."""
        return {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


#: Meta's published llama3 rope parameters, tried before any fit: Llama 3.1 / 3.3 (factor 8)
#: and Llama 3.2 1B/3B (factor 32), both with llama.cpp's ``original_max_position_embeddings``.
PUBLISHED_LLAMA3_ROPE: tuple[Llama3Rope, ...] = (
    Llama3Rope(8.0, 1.0, 4.0, 8192),
    Llama3Rope(32.0, 1.0, 4.0, 8192),
)
#: llama.cpp's converter reads ``original_max_position_embeddings`` from the top level of the
#: config, where Llama 3.x configs have none: every file it wrote used this value.
LLAMA_CPP_ORIGINAL_CONTEXT = 8192
#: Largest difference between the reciprocals of the file's factors and of the factors
#: recomputed from recovered parameters. llama.cpp computes a factor as ``1 / d``,
#: ``d = (1 - s) / F + s`` in ``[1/F, 1]``, in float32: ``d`` carries an absolute rounding error
#: of a few ``2**-24`` (times ``high / (high - low)`` through ``s``), whatever the factor's size.
#: 1e-6 is ~17 x 2**-24; a file llama.cpp wrote from the published sets is reproduced exactly.
ROPE_RECIPROCAL_TOLERANCE = 1e-6


def llama_cpp_rope_factors(rope: Llama3Rope, theta: float, dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for ``rope``: float32 divisors of
    the ``dim / 2`` rotary frequencies, computed as ``convert_hf_to_gguf.py`` does
    (``LlamaModel.generate_extra_tensors``: torch float32, operation for operation), so that
    its files are reproduced exactly."""
    import torch

    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_context_len = rope.original_max_position_embeddings
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    factors: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(torch.tensor(factors, dtype=torch.float32).numpy())


def recover_llama3_rope(
    factors: np.ndarray, theta: float, dim: int, hints: Sequence[Llama3Rope] = ()
) -> Llama3Rope | None:
    """The llama3 parameters whose llama.cpp factors (:func:`llama_cpp_rope_factors`) are
    ``factors`` to float32 precision (:data:`ROPE_RECIPROCAL_TOLERANCE`), or None when no
    parameters give them.

    ``hints`` (from the file's metadata, if any) and :data:`PUBLISHED_LLAMA3_ROPE` are tried
    first, then parameters fitted to the factors (:func:`_fitted_llama3_rope`). Every candidate
    is accepted only by recomputing its factors: the fit proposes, the formula decides.
    """
    values = np.asarray(factors, dtype=np.float32).reshape(-1)
    if dim <= 0 or dim % 2 or values.size != dim // 2 or not np.isfinite(values).all():
        return None
    for rope in (*hints, *PUBLISHED_LLAMA3_ROPE, *_fitted_llama3_rope(values, theta, dim)):
        if _reproduces(rope, values, theta, dim):
            return rope
    return None


def _reproduces(rope: Llama3Rope, factors: np.ndarray, theta: float, dim: int) -> bool:
    if not (rope.factor >= 1 and rope.high_freq_factor > rope.low_freq_factor > 0):
        return False
    if rope.original_max_position_embeddings < 1:
        return False
    recomputed = llama_cpp_rope_factors(rope, theta, dim).astype(np.float64)
    return bool(np.all(_reciprocal_error(recomputed, factors) <= ROPE_RECIPROCAL_TOLERANCE))


def _reciprocal_error(factors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``|1 / factors - 1 / reference|``, elementwise in float64: the quantity llama.cpp's
    formula computes linearly (see :data:`ROPE_RECIPROCAL_TOLERANCE`)."""
    ours = np.asarray(factors, dtype=np.float64)
    theirs = np.asarray(reference, dtype=np.float64)
    return np.asarray(np.abs(1 / ours - 1 / theirs))


def _fitted_llama3_rope(factors: np.ndarray, theta: float, dim: int) -> Iterator[Llama3Rope]:
    """Parameters that may give ``factors``, from the formula's shape.

    With ``x = 1 / wavelength`` (known from ``theta`` and ``dim``), the factors are 1 for
    ``x > v`` (``v = high_freq_factor / original``), ``factor`` for ``x < u``
    (``u = low_freq_factor / original``) and between them ``1 / factor`` is linear in ``x``:
    ``1 / r = 1/F + (1 - 1/F) (x - u) / (v - u)``. A least-squares line through the middle
    factors gives ``u`` and ``v`` (the plateau gives ``F``); with fewer than two middle factors
    any thresholds in the gaps give the same factors. Only ``u`` and ``v`` are determined, not
    ``original`` itself: each is spelled with llama.cpp's 8192, then with ``low_freq_factor``
    1, rounded values first.
    """
    r = factors.astype(np.float64)
    x = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim) / (2 * math.pi)
    tol = 1e-6  # float32 factors of 1 and of the plateau are written exactly
    top = float(r.max())
    if top <= 1 + tol or r.min() < 1 - tol or np.any(np.diff(r) < -tol * r[1:]):
        return  # llama3 factors rise from 1 with the wavelength (all 1: plain rope)
    n_ones = int(np.count_nonzero(r <= 1 + tol))
    n_top = int(np.count_nonzero(r >= top * (1 - tol)))
    for plateau in (True, False):
        middle = np.arange(n_ones, r.size - n_top if plateau else r.size)
        thresholds = _thresholds(x, 1 / r, n_ones, middle, top if plateau else None)
        if thresholds is not None:
            yield from _spellings(*thresholds)


def _thresholds(
    x: np.ndarray, inverse: np.ndarray, n_ones: int, middle: np.ndarray, top: float | None
) -> tuple[float, float, float] | None:
    """``(F, u, v)`` (see :func:`_fitted_llama3_rope`) for factors that are 1 before
    ``n_ones``, interpolated at ``middle`` and ``top`` after it. ``top`` None: no plateau
    (every frequency after the 1s is interpolated), ``F`` is chosen so that ``u`` lies beyond
    the longest wavelength."""
    if middle.size >= 2:
        slope, intercept = np.polyfit(x[middle], inverse[middle], 1)
        if slope <= 0:
            return None
        if top is None:  # u between where 1/F would reach 0 and the longest wavelength
            longest = float(x[middle[-1]])
            u = (max(-intercept / slope, 0.0) + longest) / 2
            inverse_top = intercept + slope * u
            if not 0 < inverse_top <= 1:
                return None
            top = 1 / inverse_top
        else:
            u = (1 / top - intercept) / slope
        return top, u, u + (1 - 1 / top) / slope
    if top is None:
        return None
    first = n_ones  # the middle factor, or the first of the plateau
    above = float(x[n_ones - 1]) if n_ones else 2 * float(x[0])
    if middle.size == 1:
        # v between this factor and the last 1, low enough that u stays above the plateau
        here = float(x[first])
        below = float(x[first + 1]) if first + 1 < x.size else 0.0
        smooth = (float(inverse[first]) - 1 / top) / (1 - 1 / top)
        highest = min(above, (here - (1 - smooth) * below) / smooth) if smooth > 0 else above
        v = (here + highest) / 2
        return top, (here - smooth * v) / (1 - smooth), v
    if first >= x.size:
        return None
    below = float(x[first])
    return top, below + (above - below) / 3, below + 2 * (above - below) / 3


def _spellings(top: float, u: float, v: float) -> Iterator[Llama3Rope]:
    """``(F, u, v)`` as parameters: ``original`` 8192 (what llama.cpp used), then
    ``low_freq_factor`` 1; values rounded to 6 significant digits first (a published-looking
    set is found exactly), then as fitted."""
    if not (u > 0 and v > u and top >= 1):
        return
    for original in (LLAMA_CPP_ORIGINAL_CONTEXT, max(1, round(1 / u))):
        low, high = original * u, original * v
        yield Llama3Rope(_round6(top), _round6(low), _round6(high), original)
        yield Llama3Rope(top, low, high, original)


def _round6(value: float) -> float:
    return float(f"{value:.6g}")


def _rope_from_freqs(path: Path, header: _Header, architecture: str) -> dict[str, Any] | None:
    """transformers' ``rope_parameters`` for the file's ``rope_freqs`` (``{}`` when every
    factor is 1: plain rope), or None when they fit no llama3 parameters. Only llama files
    carry llama3 scaling (llama.cpp writes Llama 3.x as ``llama``)."""
    if architecture != "llama":
        return None
    factors = _read_vector(path, header, _ROPE_FREQS)
    if factors is None:
        return None
    if np.all(factors == 1):
        return {}
    metadata = header.metadata
    theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    dim = _rope_dimensions(metadata)
    rope = recover_llama3_rope(factors, theta, dim, _rope_hints(metadata))
    return None if rope is None else rope.rope_parameters(theta)


def _rope_dimensions(metadata: dict[str, Any]) -> int:
    """Rotated dimensions per head, as llama.cpp takes them: ``rope.dimension_count``, else
    the key length, else the embedding width over the heads."""
    for key in ("llama.rope.dimension_count", "llama.attention.key_length"):
        value = metadata.get(key)
        if isinstance(value, int) and value > 0:
            return value
    width = metadata.get("llama.embedding_length")
    heads = metadata.get("llama.attention.head_count")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0:
        return width // heads
    return 0


def _rope_hints(metadata: dict[str, Any]) -> list[Llama3Rope]:
    """Parameters suggested by ``llama.rope.scaling.factor`` / ``.original_context_length``
    (llama.cpp writes neither for llama3 scaling; another converter might)."""
    factor = metadata.get("llama.rope.scaling.factor")
    original = metadata.get("llama.rope.scaling.original_context_length")
    if not isinstance(factor, int | float) and not isinstance(original, int):
        return []
    factors = [float(factor)] if isinstance(factor, int | float) else [8.0, 32.0]
    context = original if isinstance(original, int) and original > 0 else LLAMA_CPP_ORIGINAL_CONTEXT
    return [Llama3Rope(f, 1.0, 4.0, context) for f in factors]


# -- the header ------------------------------------------------------------------------------------


#: struct formats of GGUF's scalar value types (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
#: numpy types of the ggml tensor types a small vector is read in (F32, F16).
_VECTOR_TYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f4"), 1: np.dtype("<f2")}


@dataclass(frozen=True)
class _TensorInfo:
    dims: tuple[int, ...]  # ggml order (``ne``)
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class _Header:
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo] = field(default_factory=dict)
    data_start: int = 0


def _scan_header(path: Path) -> _Header:
    """Scalar and string metadata and the tensor table, streamed from the header: the ``gguf``
    package's reader parses every vocabulary entry into objects first (30 s for Gemma 3's 262k
    tokens on a shared core); skipping them takes a fraction of a second."""
    metadata: dict[str, Any] = {}
    tensors: dict[str, _TensorInfo] = {}
    try:
        with path.open("rb") as stream:
            _magic, _version, tensor_count, kv_count = struct.unpack("<4sIQQ", stream.read(24))
            for _ in range(kv_count):
                key = _string(stream)
                (value_type,) = struct.unpack("<I", stream.read(4))
                if value_type in _SCALARS:
                    fmt = _SCALARS[value_type]
                    (metadata[key],) = struct.unpack(fmt, stream.read(struct.calcsize(fmt)))
                elif value_type == 8:
                    metadata[key] = _string(stream)
                else:
                    _skip(stream, value_type)
            for _ in range(tensor_count):
                name = _string(stream)
                (n_dims,) = struct.unpack("<I", stream.read(4))
                dims = struct.unpack(f"<{n_dims}Q", stream.read(8 * n_dims))
                ggml_type, offset = struct.unpack("<IQ", stream.read(12))
                tensors[name] = _TensorInfo(tuple(int(d) for d in dims), ggml_type, offset)
            alignment = metadata.get("general.alignment", 32)
            alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
            data_start = -(-stream.tell() // alignment) * alignment
    except (OSError, ValueError, struct.error) as exc:
        raise PassError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    return _Header(metadata, tensors, data_start)


def _string(stream: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", stream.read(8))
    return str(stream.read(length).decode("utf-8", errors="replace"))


def _skip(stream: BinaryIO, value_type: int) -> None:
    if value_type in _SCALARS:
        stream.seek(struct.calcsize(_SCALARS[value_type]), 1)
    elif value_type == 8:
        (length,) = struct.unpack("<Q", stream.read(8))
        stream.seek(length, 1)
    elif value_type == 9:
        item_type, count = struct.unpack("<IQ", stream.read(12))
        if item_type in _SCALARS:
            stream.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
        else:
            for _ in range(count):
                _skip(stream, item_type)
    else:
        raise ValueError(f"unknown GGUF value type {value_type}")


def _read_vector(path: Path, header: _Header, name: str) -> np.ndarray | None:
    """A 1-D F32 / F16 tensor's values as float32, read straight from the file (None for any
    other shape or type)."""
    info = header.tensors[name]
    dtype = _VECTOR_TYPES.get(info.ggml_type)
    if dtype is None or len(info.dims) != 1:
        return None
    count = info.dims[0]
    try:
        with path.open("rb") as stream:
            stream.seek(header.data_start + info.offset)
            data = stream.read(count * dtype.itemsize)
    except OSError as exc:
        raise PassError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    if len(data) != count * dtype.itemsize:
        raise PassError(f"{path.name} is truncated: tensor {name} runs past the end of the file")
    values: np.ndarray = np.frombuffer(data, dtype=dtype).astype(np.float32)
    return values


def save_gguf_as_hf(path: Path, out_dir: Path, scratch_dir: Path | None = None) -> Path:
    """The GGUF model dequantized into a Hugging Face folder (see :func:`save_hf_folder`)."""
    model, tokenizer = load_gguf_causal_lm(path, scratch_dir=scratch_dir)
    return save_hf_folder(model, tokenizer, out_dir)


def save_hf_folder(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """``model`` and ``tokenizer`` as a Hugging Face folder (``config.json``,
    ``model.safetensors``, tokenizer files and chat template) that onnxruntime-genai's model
    builder reads; returns ``out_dir``."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    try:
        model.save_pretrained(out_dir)
    finally:
        model.config.use_cache = False
    tokenizer.save_pretrained(out_dir)
    # A model loaded from GGUF keeps transformers' GGUF marker; its weights are plain fp32 now.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir
