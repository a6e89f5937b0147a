"""Two model slots: the active one serves, the previous one waits for an instant local rollback.

A new model is loaded into its own ONNX Runtime session beside the serving one, smoke-tested
(it runs, its outputs are finite and shaped like the running model's), then swapped in by
replacing one reference. A request reads that reference once, so it finishes on the session it
started with: no request fails or mixes models during a swap. Inputs and outputs stay here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from slmops_gateway.verify import Refused

_SMOKE_TEXT = "The gateway checks a new model on this sentence before it serves with it."


@dataclass(frozen=True)
class SessionOptions:
    """Local overrides (an assignment's overlay may set them): threads and max input length."""

    intra_op_threads: int = 1
    max_input_tokens: int = 256


@dataclass
class LoadedModel:
    variant_id: str
    version: str
    path: Path
    session: Any
    task: str
    tokenizer: Any  # tokenizers.Tokenizer, or None: the caller sends token ids
    input_names: list[str]
    options: SessionOptions
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def run(self, texts: list[str] | None = None, ids: list[list[int]] | None = None) -> Any:
        """One request, one text (or id row) at a time: the first output of each, as numpy."""
        rows = self._rows(texts, ids)
        outputs = []
        for row in rows:
            feed_ids = np.asarray([row], dtype=np.int64)
            full = {
                "input_ids": feed_ids,
                "attention_mask": np.ones_like(feed_ids),
                "token_type_ids": np.zeros_like(feed_ids),
                "position_ids": np.arange(feed_ids.shape[1], dtype=np.int64)[None, :],
            }
            feed = {name: full[name] for name in self.input_names}
            outputs.append(self.session.run(None, feed)[0])
        return outputs

    def _rows(self, texts: list[str] | None, ids: list[list[int]] | None) -> list[list[int]]:
        limit = self.options.max_input_tokens
        if ids is not None:
            return [row[:limit] for row in ids]
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return [e.ids[:limit] for e in self.tokenizer.encode_batch(texts or [])]


def load(path: Path, variant_id: str, version: str, options: SessionOptions) -> LoadedModel:
    """A new session for the file at ``path`` (the serving one is untouched)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT refuses the model: the smoke test failed at load
        raise Refused(f"smoke test: ONNX Runtime cannot load the model: {str(exc)[:300]}") from None
    meta = session.get_modelmeta().custom_metadata_map
    tokenizer = None
    if "slmops.tokenizer" in meta:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(meta["slmops.tokenizer"])
        tokenizer.no_padding()
        tokenizer.no_truncation()
    names = [i.name for i in session.get_inputs()]
    unknown = set(names) - {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    if unknown:
        raise Refused(f"smoke test: the model asks for inputs a gateway cannot make: {unknown}")
    task = meta.get("slmops.task", "feature-extraction")
    return LoadedModel(variant_id, version, path, session, task, tokenizer, names, options)


def smoke_test(candidate: LoadedModel, running: LoadedModel | None) -> None:
    """The candidate runs, gives finite outputs, shaped like the running model's."""
    ids = None if candidate.tokenizer else [[101, 2023, 2003, 1037, 3231, 102]]
    texts = [_SMOKE_TEXT] if candidate.tokenizer else None
    try:
        (out,) = candidate.run(texts, ids)
    except Exception as exc:
        raise Refused(f"smoke test: the model fails to run: {str(exc)[:300]}") from None
    if not np.isfinite(out).all():
        raise Refused(f"smoke test: {int((~np.isfinite(out)).sum())} non-finite output values")
    if running is not None and running.tokenizer is not None and candidate.tokenizer is not None:
        (before,) = running.run(texts, ids)
        if before.shape[-1] != out.shape[-1]:
            raise Refused(
                f"smoke test: output width {out.shape[-1]} differs from the running model's "
                f"{before.shape[-1]}"
            )


class Slots:
    """The active and previous models; swapping is one reference assignment under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active: LoadedModel | None = None
        self.previous: LoadedModel | None = None

    def swap_in(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` active; the one it replaces becomes ``previous`` (returned)."""
        with self._lock:
            replaced = self.active
            self.previous, self.active = replaced, model
            return replaced

    def roll_back(self) -> LoadedModel:
        """Instant local rollback: the previous model serves again."""
        with self._lock:
            if self.previous is None:
                raise Refused("no previous model to roll back to")
            self.active, self.previous = self.previous, self.active
            return self.active
