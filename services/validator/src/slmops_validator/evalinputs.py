"""Evaluation inputs: the texts a variant and its reference are both fed, as ONNX feeds.

Texts come from the model version's JSONL set, else the SDK's built-in English set. They are
tokenized with the tokenizer the optimizer stamped into the variant (``slmops.tokenizer``), so
the validator needs no source folder. Encoders get one text per row, cut to the max length
(counted and said in the report); decoders get fixed next-token windows over the concatenated
texts. A model without a tokenizer (an ONNX source) is fed seeded random token ids, said so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slmops.evaldata import DEFAULT_EVAL_SET_NAME, EvalRecord
from slmops.generation import GenerationSpec
from slmops.reports import EvalSetInfo
from slmops_validator.settings import ValidatorSettings

Feed = dict[str, np.ndarray]
# One text (or window) per run, as a gateway serves requests: a dynamically quantized model's
# activation scale spans the whole input, so batch-mates and padding would move its figures.
_ENCODER_BATCH = 1
_DECODER_BATCH = 1
_SYNTHETIC_TOKENS = 32


@dataclass(frozen=True)
class EvalInputs:
    task: str
    feeds: list[Feed]  # batches, every input the graphs may ask for
    labels: list[str | int] | None  # one per encoder row, when the set is labelled
    label_source: str  # "label", "topic" or ""
    latency_feed: Feed  # one row of ``latency_tokens`` tokens
    info: EvalSetInfo
    prompts: list[list[int]] = dataclasses.field(default_factory=list)  # decoders: one per text
    generation: GenerationSpec | None = None  # a generation-ready decoder's spec


def build_inputs(
    metadata: dict[str, str],
    task: str,
    records: Sequence[EvalRecord],
    settings: ValidatorSettings,
    *,
    set_name: str = DEFAULT_EVAL_SET_NAME,
    set_digest: str | None = None,
    vocab_size: int = 1000,
) -> EvalInputs:
    records = list(records)[: settings.eval_max_examples]
    origin = "eval-set" if set_digest else "built-in"
    raw = metadata.get("slmops.tokenizer")
    if raw is None:
        return _synthetic(task, settings, vocab_size)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(raw)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    model_max = _model_max_length(metadata)
    if task == "text-generation":
        inputs = _decoder(tokenizer, records, settings, origin, set_name, set_digest)
        prompts = [e.ids for e in tokenizer.encode_batch([r.text for r in records])]
        inputs = dataclasses.replace(inputs, prompts=[p for p in prompts if p])
        return _with_empty_past(inputs, GenerationSpec.from_metadata(metadata))
    max_tokens = min(settings.eval_max_tokens, model_max or settings.eval_max_tokens)
    full = [e.ids for e in tokenizer.encode_batch([r.text for r in records])]
    truncated = sum(1 for ids in full if len(ids) > max_tokens)
    rows = [ids if len(ids) <= max_tokens else ids[: max_tokens - 1] + ids[-1:] for ids in full]
    feeds = [
        _padded(rows[i : i + _ENCODER_BATCH], _pad_id(tokenizer))
        for i in range(0, len(rows), _ENCODER_BATCH)
    ]
    labels, source = _labels(records)
    info = EvalSetInfo(
        name=set_name,
        digest=set_digest,
        examples=len(rows),
        labelled=len(labels or []),
        label_source=source,
        truncated=truncated,
        max_tokens=max_tokens,
        origin=origin,
    )
    stream = [t for ids in full for t in ids]
    latency_len = min(settings.latency_tokens, max_tokens)
    return EvalInputs(task, feeds, labels, source, _row(stream, latency_len), info)


def _decoder(
    tokenizer: Any,
    records: list[EvalRecord],
    settings: ValidatorSettings,
    origin: str,
    set_name: str,
    set_digest: str | None,
) -> EvalInputs:
    stream = [t for e in tokenizer.encode_batch([r.text for r in records]) for t in e.ids]
    span = settings.decoder_window_tokens
    if len(stream) < span:  # a tiny set: repeat it rather than fail
        stream = (stream * (span // max(1, len(stream)) + 1))[:span]
    count = min(settings.eval_max_examples, len(stream) // span)
    windows = [stream[i * span : (i + 1) * span] for i in range(count)]
    feeds = [_padded(windows[i : i + _DECODER_BATCH], 0) for i in range(0, count, _DECODER_BATCH)]
    info = EvalSetInfo(
        name=set_name, digest=set_digest, examples=count, max_tokens=span, origin=origin
    )
    latency_len = min(settings.latency_tokens, len(stream))
    return EvalInputs("text-generation", feeds, None, "", _row(stream, latency_len), info)


def _with_empty_past(inputs: EvalInputs, spec: GenerationSpec | None) -> EvalInputs:
    """A generation graph (KV cache in and out) runs each window in one step from an empty
    cache: every feed gets zero-length past keys and values."""
    if spec is None:
        return inputs

    def full(feed: Feed) -> Feed:
        return {**feed, **spec.empty_past(int(feed["input_ids"].shape[0]))}

    return dataclasses.replace(
        inputs,
        feeds=[full(f) for f in inputs.feeds],
        latency_feed=full(inputs.latency_feed),
        generation=spec,
    )


def _synthetic(task: str, settings: ValidatorSettings, vocab_size: int) -> EvalInputs:
    rng = np.random.default_rng(0)
    low = min(1000, vocab_size // 4)
    span = settings.decoder_window_tokens if task == "text-generation" else _SYNTHETIC_TOKENS
    count = min(settings.eval_max_examples, 32)
    rows = rng.integers(low, vocab_size, size=(count, span)).tolist()
    batch = _DECODER_BATCH if task == "text-generation" else _ENCODER_BATCH
    feeds = [_padded(rows[i : i + batch], 0) for i in range(0, count, batch)]
    info = EvalSetInfo(
        name="random token ids (the model has no tokenizer)",
        examples=count,
        max_tokens=span,
        origin="synthetic",
    )
    return EvalInputs(task, feeds, None, "", _row(rows[0], span), info)


def _padded(rows: list[list[int]], pad_id: int) -> Feed:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return _with_derived(ids, mask)


def _row(stream: list[int], length: int) -> Feed:
    ids = np.asarray([stream[:length]], dtype=np.int64)
    return _with_derived(ids, np.ones_like(ids))


def _with_derived(ids: np.ndarray, mask: np.ndarray) -> Feed:
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "position_ids": positions,
    }


def _pad_id(tokenizer: Any) -> int:
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def _model_max_length(metadata: dict[str, str]) -> int | None:
    try:
        value = int(metadata.get("slmops.max_length", "0"))
    except ValueError:
        return None
    return value if 0 < value < 1_000_000 else None


def _labels(records: list[EvalRecord]) -> tuple[list[str | int] | None, str]:
    """Labels when every example has one; else topics when every example has one."""
    if records and all(r.label is not None for r in records):
        return [r.label for r in records if r.label is not None], "label"
    if records and all(r.topic for r in records):
        return [r.topic for r in records if r.topic], "topic"
    return None, ""


def restrict(feed: Feed, input_names: Sequence[str]) -> Feed:
    """The feed with only the inputs a graph declares (KeyError names a missing one)."""
    missing = [n for n in input_names if n not in feed]
    if missing:
        raise KeyError(f"the model asks for inputs the validator cannot make: {missing}")
    return {name: feed[name] for name in input_names}
