"""Load a GGUF causal LM into torch (dequantized to float32) together with its tokenizer.

transformers' GGUF loader dequantizes every tensor and un-permutes the llama q/k rows; the model
it returns cannot be saved (``save_pretrained`` fails with "not serializable") and may use an
attention kernel the TorchScript exporter cannot trace, so its weights are copied into a fresh
model built from the same config with eager attention.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

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
    or a file it would load as another model (rope scaling it does not read, see
    :func:`_config_transformers_misses`) raises :class:`PassError`.
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
_DROPPED_ROPE_TENSORS = {
    "rope_freqs.weight": "Llama 3 rope scaling (rope_freqs: Llama 3.1/3.2 files)",
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

    - rope scaling, as tensors (``rope_freqs``, ``rope_factors_long/short``) or as
      ``{arch}.rope.scaling.*`` keys (gemma3 4B+ linear, YaRN...): never read, the model
      rotates with plain rope and its logits differ from the file's model at every position.
      The file is refused (the export check compares against that same wrong torch model, so
      nothing downstream would notice).
    - ``qwen3.attention.key_length``: not mapped, the config keeps Qwen3Config's default head
      size 128 (every published Qwen3); any other head size failed with "size mismatch".
    """
    metadata, tensors = _scan_header(path)
    dropped = sorted({_DROPPED_ROPE_TENSORS[n] for n in tensors if n in _DROPPED_ROPE_TENSORS})
    scaling = str(metadata.get(f"{architecture}.rope.scaling.type", "none")).lower()
    factor = metadata.get(f"{architecture}.rope.scaling.factor", 1.0)
    if scaling not in ("none", "") and factor != 1.0:
        dropped.append(f"{scaling} rope scaling (factor {factor:g})")
    if dropped:
        raise PassError(
            f"{path.name} uses {'; '.join(dropped)}, which transformers' GGUF loader ignores: "
            "the converted model would not be the file's model. Publish the Hugging Face "
            "checkpoint instead"
        )
    overrides: dict[str, Any] = {}
    key_length = metadata.get(f"{architecture}.attention.key_length")
    if architecture == "qwen3" and isinstance(key_length, int) and key_length > 0:
        overrides["head_dim"] = key_length
    return overrides


#: struct formats of GGUF's scalar value types (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip


def _scan_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Scalar and string metadata and the tensor names, streamed from the header: the ``gguf``
    package's reader parses every vocabulary entry into objects first (30 s for Gemma 3's 262k
    tokens on a shared core); skipping them takes a fraction of a second."""
    import struct

    def string(stream: Any) -> str:
        (length,) = struct.unpack("<Q", stream.read(8))
        return str(stream.read(length).decode("utf-8", errors="replace"))

    def skip(stream: Any, value_type: int) -> None:
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
                    skip(stream, item_type)
        else:
            raise ValueError(f"unknown GGUF value type {value_type}")

    metadata: dict[str, Any] = {}
    names: list[str] = []
    try:
        with path.open("rb") as stream:
            _magic, _version, tensor_count, kv_count = struct.unpack("<4sIQQ", stream.read(24))
            for _ in range(kv_count):
                key = string(stream)
                (value_type,) = struct.unpack("<I", stream.read(4))
                if value_type in _SCALARS:
                    fmt = _SCALARS[value_type]
                    (metadata[key],) = struct.unpack(fmt, stream.read(struct.calcsize(fmt)))
                elif value_type == 8:
                    metadata[key] = string(stream)
                else:
                    skip(stream, value_type)
            for _ in range(tensor_count):
                names.append(string(stream))
                (n_dims,) = struct.unpack("<I", stream.read(4))
                stream.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
    except (OSError, ValueError, struct.error) as exc:
        raise PassError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    return metadata, names


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
