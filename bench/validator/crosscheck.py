"""Parity recomputed for one variant per model, independently of the validator's code path.

Nothing of ``slmops.quality``, ``slmops_validator.evalinputs`` or ``checks.parity`` is used:
both models are downloaded from the store and run with ONNX Runtime directly, batch size 1,
no padding; the texts are the first built-in ones, tokenized with the Hugging Face tokenizer
(MiniLM: its source folder; SmolLM2: the one the optimizer's conversion kept), whose ids are
first compared with those of the tokenizer stamped into the variant. Figures in numpy here:

* encoders: per text, the cosine of the attention-mask mean of the last hidden states of
  both models; mean and min over the texts;
* decoders: the token ids of all texts concatenated, cut into windows of 64 (at most 96);
  top-1 next-token agreement over every position; perplexity = exp(mean NLL of token t+1
  given the logits at t) per model, and the candidate's increase over fp32 in %.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.optimizer.common import THREADS
from bench.validator.timing import Timed
from slmops.evaldata import default_texts
from slmops.objectstore import ObjectStore
from slmops_validator.settings import ValidatorSettings

AGREE_TOLERANCE = 5e-4  # "agree to 3 decimals"


@dataclass
class Cross:
    timed: Timed
    figures: list[tuple[str, str, float]] = field(default_factory=list)  # label, gate, bench
    notes: list[str] = field(default_factory=list)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_batch(session: Any, ids: np.ndarray, mask: np.ndarray, output: str) -> np.ndarray:
    made = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape),
    }
    feed = {i.name: made[i.name] for i in session.get_inputs()}  # KeyError: an unknown input
    return np.asarray(session.run([output], feed)[0], dtype=np.float64)


def _run(session: Any, ids: list[int], output: str) -> np.ndarray:
    row = np.asarray([ids], dtype=np.int64)
    return np.asarray(_run_batch(session, row, np.ones_like(row), output)[0])


def _output(session: Any, preferred: str) -> str:
    names = [o.name for o in session.get_outputs()]
    return preferred if preferred in names else names[0]


def _compare_ids(
    texts: list[str], hf_ids: list[list[int]], metadata: str | None, notes: list[str]
) -> None:
    if metadata is None:
        notes.append("the variant has no slmops.tokenizer metadata: ids not compared")
        return
    from tokenizers import Tokenizer

    stamped = Tokenizer.from_str(metadata)
    stamped.no_padding()
    stamped.no_truncation()
    stamped_ids = [e.ids for e in stamped.encode_batch(texts)]
    differ = [i for i, (a, b) in enumerate(zip(hf_ids, stamped_ids, strict=True)) if a != b]
    if not differ:
        notes.append(f"token ids: HF tokenizer == variant's stamped tokenizer on all "
                     f"{len(hf_ids)} texts")  # fmt: skip
        return
    first = differ[0]
    notes.append(
        f"token ids DIFFER on {len(differ)} of {len(hf_ids)} texts; text {first}: HF "
        f"{hf_ids[first][:12]}... ({len(hf_ids[first])}) vs stamped "
        f"{stamped_ids[first][:12]}... ({len(stamped_ids[first])}); the bench uses the HF ids"
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _encoder(ref: Any, cand: Any, rows: list[list[int]]) -> list[float]:
    """Batch 1, no padding: the attention-mask mean is the plain mean over the tokens."""
    ref_out, cand_out = _output(ref, "last_hidden_state"), _output(cand, "last_hidden_state")
    return [
        _cosine(_run(ref, ids, ref_out).mean(axis=0), _run(cand, ids, cand_out).mean(axis=0))
        for ids in rows
    ]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))


def _decoder(ref: Any, cand: Any, windows: list[list[int]], out: list[Any]) -> list[str]:
    ref_out, cand_out = _output(ref, "logits"), _output(cand, "logits")
    agree = positions = pairs = 0
    nll = {"fp32": 0.0, "candidate": 0.0}
    for window in windows:
        targets = np.asarray(window[1:])
        logits = {"fp32": _run(ref, window, ref_out), "candidate": _run(cand, window, cand_out)}
        agree += int((logits["fp32"].argmax(-1) == logits["candidate"].argmax(-1)).sum())
        positions += len(window)
        pairs += len(targets)
        for name, value in logits.items():
            logp = _log_softmax(value[:-1])[np.arange(len(targets)), targets]
            nll[name] -= float(logp.sum())
    ppl = {name: float(np.exp(total / pairs)) for name, total in nll.items()}
    increase = 100.0 * (ppl["candidate"] / ppl["fp32"] - 1.0)
    out += [
        ("top1_agreement", "parity.top1_agreement", agree / positions),
        ("perplexity_increase_pct", "parity.perplexity_increase_pct", increase),
    ]
    return [f"bench: {len(windows)} windows, {positions} positions, perplexity "
            f"{ppl['fp32']:.3f} -> {ppl['candidate']:.3f}"]  # fmt: skip


def crosscheck(
    timed: Timed, hf_tokenizer: Any, store: ObjectStore, tmp: Path, settings: ValidatorSettings
) -> Cross:
    done = timed.report
    assert done is not None
    assert done.reference is not None
    cross = Cross(timed)
    folder = tmp / "crosscheck" / timed.job.spec.job_id
    folder.mkdir(parents=True, exist_ok=True)
    store.get_to_file(done.reference.digest, folder / "fp32.onnx")
    store.get_to_file(done.candidate.digest, folder / "variant.onnx")
    ref, cand = _session(folder / "fp32.onnx"), _session(folder / "variant.onnx")
    texts = default_texts()[: settings.eval_max_examples]
    hf_ids = [list(ids) for ids in hf_tokenizer(texts, add_special_tokens=True)["input_ids"]]
    stamped = cand.get_modelmeta().custom_metadata_map.get("slmops.tokenizer")
    _compare_ids(texts, hf_ids, stamped, cross.notes)
    if timed.job.spec.task == "text-generation":
        stream = [t for ids in hf_ids for t in ids]
        span = settings.decoder_window_tokens
        count = min(settings.eval_max_examples, len(stream) // span)
        windows = [stream[i * span : (i + 1) * span] for i in range(count)]
        cross.notes += _decoder(ref, cand, windows, cross.figures)
    else:
        limit = settings.eval_max_tokens
        model_max = getattr(hf_tokenizer, "model_max_length", 0)
        if isinstance(model_max, int) and 0 < model_max < 1_000_000:
            limit = min(limit, model_max)
        rows = [ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:] for ids in hf_ids]
        cut = sum(1 for ids in hf_ids if len(ids) > limit)
        cross.notes.append(f"bench: {len(rows)} texts, batch 1, {cut} cut to {limit} tokens")
        single = _encoder(ref, cand, rows)
        cross.figures += [
            ("cosine_mean", "parity.cosine_mean", float(np.mean(single))),
            ("cosine_min", "parity.cosine_min", float(np.min(single))),
        ]
    return cross


def table(crosses: list[Cross]) -> list[str]:
    from bench.validator.tables import render

    headers = ["model", "class / recipe", "figure", "service", "bench", "|diff|",
               "agree to 3 decimals"]  # fmt: skip
    rows, notes = [], []
    for cross in crosses:
        job = cross.timed.job
        for label, name, mine in cross.figures:
            gate = cross.timed.gate(name)
            theirs = None if gate is None else gate.value
            diff = None if theirs is None else abs(theirs - mine)
            rows.append([
                job.spec.model_name, f"{job.device_class} / {job.recipe}", label,
                "-" if theirs is None else f"{theirs:.4f}", f"{mine:.4f}",
                "-" if diff is None else f"{diff:.1e}",
                "no" if diff is None or diff >= AGREE_TOLERANCE else "yes",
            ])  # fmt: skip
        gates = cross.timed.report.gates if cross.timed.report else []
        shown = ("parity.perplexity_increase_pct", "parity.cosine_mean")
        service = [g.detail for g in gates if g.name in shown]
        notes += [f"  {job.spec.model_name}: {n}" for n in cross.notes]
        notes += [f"  {job.spec.model_name}: service: {d}" for d in service]
    return render(headers, rows) + notes
