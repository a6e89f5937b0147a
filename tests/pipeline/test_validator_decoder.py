"""Decoder parity on a tiny causal LM (Gather → MatMul to the vocabulary): top-1 agreement and
perplexity increase as the validator reports them, against a numpy recomputation here."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from slmops.events import OptimizationCompleted
from slmops.events.payloads import PassSpec, Recipe
from slmops_validator.evalinputs import build_inputs
from slmops_validator.validate import Subject, validate

pytestmark = [pytest.mark.integration]
VOCAB, HIDDEN = 256, 16


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    from pathlib import Path

    return {"profiles_dir": Path(__file__).parent / "profiles-validator"}


def _decoder(emb: np.ndarray, head: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
            helper.make_node("MatMul", ["x", "head"], ["logits"]),
        ],
        "tiny-lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(head, "head")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_decoder_parity_matches_an_independent_recomputation(validator: Any) -> None:
    # setup: a reference LM and a candidate with noisy output weights
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype("float32")
    head = rng.standard_normal((HIDDEN, VOCAB)).astype("float32")
    noisy = (head + 0.6 * rng.standard_normal(head.shape)).astype("float32")
    reference = await validator.put_blob(_decoder(emb, head))
    candidate = await validator.put_blob(_decoder(emb, noisy))
    recipe = Recipe(name="noisy", passes=[PassSpec(name="convert")])
    completed = OptimizationCompleted(
        model_name="lm", version="1", variant_id="v-lm", device_class="test-cpu",
        parent_digest=reference.digest, recipe=recipe, artifact=candidate, duration_s=0.0,
        reference=reference,
    )  # fmt: skip
    ctx = validator.context

    # execute
    report = await validate(
        Subject(completed, "text-generation", None), ctx.profiles["test-cpu"], ctx.models,
        ctx.settings,
    )  # fmt: skip

    # assert: the same windows, recomputed with plain numpy, give the same figures
    gates = {g.name: g for g in report.gates}
    inputs = build_inputs({}, "text-generation", [], ctx.settings, vocab_size=VOCAB)
    agree = total = 0
    nll = {"ref": 0.0, "cand": 0.0}
    pairs = 0
    for feed in inputs.feeds:
        ids = feed["input_ids"]
        ref_logits, cand_logits = emb[ids] @ head, emb[ids] @ noisy
        agree += int((ref_logits.argmax(-1) == cand_logits.argmax(-1)).sum())
        total += ids.size
        for name, logits in (("ref", ref_logits), ("cand", cand_logits)):
            x = logits[:, :-1].astype(np.float64)
            logp = x - x.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll[name] -= float(np.take_along_axis(logp, ids[:, 1:, None], -1).sum())
        pairs += ids[:, 1:].size
    top1 = agree / total
    ppl_increase = 100 * (np.exp(nll["cand"] / pairs) / np.exp(nll["ref"] / pairs) - 1)
    assert gates["parity.top1_agreement"].value == pytest.approx(top1, abs=1e-9)
    assert gates["parity.perplexity_increase_pct"].value == pytest.approx(ppl_increase, rel=1e-4)
    assert 0.2 < top1 < 0.95  # damaged enough to fail the 0.9 floor of test-cpu
    assert report.verdict == "failed"
    assert "parity.top1_agreement" in report.reason
    assert report.eval_set is not None
    assert report.eval_set.origin == "synthetic"  # no tokenizer in the model: said so
