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
    it. An architecture outside :data:`SUPPORTED_ARCHITECTURES`, or one transformers cannot
    load, raises :class:`PassError`.
    """
    import torch
    import transformers

    path = Path(path).resolve()
    architecture = read_architecture(path)  # the header only: fails fast on a wrong file
    require_supported(architecture)
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
                folder, gguf_file=link.name, dtype=torch.float32, local_files_only=True
            )
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
