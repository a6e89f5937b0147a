"""The generation spec of a built decoder, from the builder's folder, and its stamp on a graph.

The builder leaves ``genai_config.json`` (the runtime's config: input/output names, head counts,
eos ids, context length) and the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) beside the graph. They become one :class:`~slmops.generation.
GenerationSpec` plus the tokenizer JSON in the ONNX file's metadata, so every variant and the
fp32 reference are single self-describing files (one digest signed, chunked, downloaded and
verified as a unit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmops.generation import METADATA_KEY, TOKENIZER_KEY, GenerationSpec, stop_tokens
from slmops_optimizer.passes.base import PassError

SPEC_FILE = "generation.json"
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token")


def spec_from_folder(folder: Path) -> GenerationSpec:
    """The spec of the builder's output ``folder``."""
    try:
        config = json.loads((folder / "genai_config.json").read_text())
        tokenizer_json = (folder / "tokenizer.json").read_text()
    except (OSError, ValueError) as exc:
        raise PassError(f"the built decoder lacks its runtime config or tokenizer: {exc}") from exc
    tokenizer_config = _json_or_empty(folder / "tokenizer_config.json")
    model = config["model"]
    eos = model.get("eos_token_id", [])
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return GenerationSpec(
        runtime_config=config,
        context_length=int(model["context_length"]),
        vocab_size=int(model["vocab_size"]),
        chat_template=_chat_template(folder, tokenizer_config),
        special_tokens=_special_tokens(tokenizer_config, tokenizer_json),
        stop_token_ids=stop_tokens(tokenizer_json, eos_ids),
    )


def stamp(proto: Any, spec: GenerationSpec, tokenizer_json: str) -> None:
    """Put the spec and the tokenizer into ``proto``'s metadata (replacing older values)."""
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = spec.to_metadata()
    props[TOKENIZER_KEY] = tokenizer_json
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)


def _chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _special_tokens(tokenizer_config: dict[str, Any], tokenizer_json: str) -> dict[str, str]:
    """The template's special-token variables, as strings (transformers 5 may store them as
    ``{"content": ...}`` objects, or only as ``added_tokens`` flagged special)."""
    found: dict[str, str] = {}
    for key in _SPECIAL:
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            found[key] = value
    return found


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_generation_file(hf_dir: Path, out: Path, work_dir: Path) -> Path:
    """The fp32 generation-ready file of a Hugging Face causal LM folder, in one step: built,
    its spec and tokenizer stamped, weights inline. For benchmarks and tests; a job reaches the
    same file through ``convert`` and its finalization."""
    import onnx

    from slmops_optimizer.generation.build import build_decoder

    built = build_decoder(hf_dir, work_dir / "built", work_dir / "builder-cache")
    spec = spec_from_folder(built.parent)
    proto = onnx.load(str(built), load_external_data=True)
    stamp(proto, spec, (built.parent / "tokenizer.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return out
