"""Two model slots: the active one serves, the previous one waits for an instant local rollback.

A new model is loaded beside the serving one, smoke-tested, then swapped in by replacing one
reference. A request reads that reference once, so it finishes on the model it started with: no
request fails or mixes models during a swap, and an old model is freed when its last request
ends (plain reference counting). Inputs and outputs stay here.

Two kinds of model: a generation-ready decoder (its metadata carries ``slmops.generation``) is
held as a :class:`~slmops.generation.DecoderEngine` (onnxruntime-genai, a KV cache per
request) and smoke-tested by generating a few greedy tokens; anything else (encoders, older
decoders without a KV cache) gets a plain ONNX Runtime session, smoke-tested for finite outputs
shaped like the running model's. An encoder's embedding output and pooling are chosen once at
load, from what the optimizer stamped into its metadata (else by the outputs' shapes).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from slmops.embeddings import (
    EmbeddingChoice,
    EmbeddingChoiceError,
    choose_embedding_output,
    hints_from_metadata,
    outputs_from_ort,
    pool,
)
from slmops.generation import METADATA_KEY, DecoderEngine
from slmops.onnxmeta import OnnxMetadataError, read_metadata
from slmops_gateway.verify import Refused

_SMOKE_TEXT = "The gateway checks a new model on this sentence before it serves with it."
_SMOKE_TOKENS = 4  # greedy tokens a decoder generates in its smoke test


@dataclass(frozen=True)
class SessionOptions:
    """Local overrides (an assignment's overlay may set them): threads and max input length."""

    intra_op_threads: int = 1
    max_input_tokens: int = 256  # encoders: longer inputs are cut to this
    # Decoders: the overlay's max_input_tokens when it sets one (longer prompts are refused);
    # None: only the context length limits a prompt. The gateway-wide default is not applied
    # to decoders: a chat with its system prompt and history outgrows 256 tokens quickly.
    max_prompt_tokens: int | None = None


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
    engine: DecoderEngine | None = None  # a generation-ready decoder's token loop
    embedding: EmbeddingChoice | None = None  # an encoder's embedding output and pooling
    embedding_error: str = ""  # why an encoder has no embedding choice (its outputs are unclear)
    model_name: str | None = None
    # The version its signed variant manifest names (``version`` is the release's, which may be
    # later for a reused variant): downgrades are judged on this one, which nobody can forge.
    signed_version: str | None = None

    @property
    def model_id(self) -> str:
        """What local apps call it (OpenAI's ``model``): the model's name, else the variant."""
        return self.model_name or self.variant_id

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """One unit-length vector per text (cut to ``max_input_tokens``) and the tokens read."""
        if self.embedding is None or self.tokenizer is None:
            raise ValueError(self.embedding_error or "this model has no tokenizer")
        vectors, tokens = [], 0
        for row in self._rows(texts, None):
            (out,) = self.session.run([self.embedding.output], self._feed(row))
            mask = np.ones((1, len(row)), dtype=np.int64)
            vector = pool(np.asarray(out), mask, self.embedding)[0]
            norm = float(np.linalg.norm(vector))
            vectors.append(vector / norm if norm > 0 else vector)
            tokens += len(row)
        return np.asarray(vectors), tokens

    def run(self, texts: list[str] | None = None, ids: list[list[int]] | None = None) -> Any:
        """One request, one text (or id row) at a time: the first output of each, as numpy."""
        rows = self._rows(texts, ids)
        outputs = []
        for row in rows:
            outputs.append(self.session.run(None, self._feed(row))[0])
        return outputs

    def _feed(self, row: list[int]) -> dict[str, Any]:
        """One row's inputs, those of the graph's inputs it asks for (no padding: one row)."""
        feed_ids = np.asarray([row], dtype=np.int64)
        full = {
            "input_ids": feed_ids,
            "attention_mask": np.ones_like(feed_ids),
            "token_type_ids": np.zeros_like(feed_ids),
            "position_ids": np.arange(feed_ids.shape[1], dtype=np.int64)[None, :],
        }
        return {name: full[name] for name in self.input_names}

    def _rows(self, texts: list[str] | None, ids: list[list[int]] | None) -> list[list[int]]:
        limit = self.options.max_input_tokens
        if ids is not None:
            return [row[:limit] for row in ids]
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids")
        return [e.ids[:limit] for e in self.tokenizer.encode_batch(texts or [])]


def load(
    path: Path, variant_id: str, version: str, options: SessionOptions, *,
    model_name: str | None = None, runtime_dir: Path | None = None,
) -> LoadedModel:  # fmt: skip
    """The model in the file at ``path``, loaded beside the serving one (which is untouched).

    ``runtime_dir``: where a decoder's runtime folder goes (default: beside the file).
    """
    import onnxruntime as ort

    try:
        metadata = read_metadata(path)
    except (OnnxMetadataError, OSError):
        metadata = {}  # not ONNX as this reader knows it: ONNX Runtime says why below
    if METADATA_KEY in metadata:
        folder = runtime_dir or path.parent / "runtime" / variant_id
        return _load_decoder(path, folder, variant_id, version, options, metadata, model_name)

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
    model = LoadedModel(variant_id, version, path, session, task, tokenizer, names, options,
                        model_name=model_name)  # fmt: skip
    if task == "feature-extraction":
        try:
            name, pooling = hints_from_metadata(meta)
            outputs = outputs_from_ort(session.get_outputs())
            model.embedding = choose_embedding_output(outputs, name=name, pooling=pooling)
        except EmbeddingChoiceError as exc:  # /v1/infer still serves; /v1/embeddings says why
            model.embedding_error = str(exc)
    return model


def _load_decoder(
    path: Path, runtime_dir: Path, variant_id: str, version: str, options: SessionOptions,
    metadata: dict[str, str], model_name: str | None,
) -> LoadedModel:  # fmt: skip
    from slmops.generation import NotGenerationReady

    try:
        engine = DecoderEngine.load(path, runtime_dir, threads=options.intra_op_threads)
    except NotGenerationReady as exc:
        raise Refused(f"smoke test: {exc}") from None
    except Exception as exc:  # the runtime refuses the graph or its config
        raise Refused(
            f"smoke test: onnxruntime-genai cannot load the model: {str(exc)[:300]}"
        ) from None
    task = metadata.get("slmops.task", "text-generation")
    return LoadedModel(variant_id, version, path, None, task, None, [], options, engine=engine,
                       model_name=model_name)  # fmt: skip


def smoke_test(candidate: LoadedModel, running: LoadedModel | None) -> None:
    """The candidate runs, gives finite outputs, shaped like the running model's (a decoder:
    generates a few greedy tokens, each a valid id)."""
    if candidate.engine is not None:
        _smoke_decoder(candidate.engine)
        return
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


def _smoke_decoder(engine: DecoderEngine) -> None:
    prompt = engine.codec.encode(_SMOKE_TEXT, add_special_tokens=True)
    prompt = prompt[: max(1, engine.context_length - _SMOKE_TOKENS)] or [0]
    try:
        tokens = engine.greedy(prompt, _SMOKE_TOKENS)
    except Exception as exc:
        raise Refused(f"smoke test: the model fails to generate: {str(exc)[:300]}") from None
    vocab = engine.spec.vocab_size
    invalid = [t for t in tokens if not 0 <= t < vocab]
    if invalid:
        raise Refused(f"smoke test: generated ids outside the vocabulary of {vocab}: {invalid}")


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
