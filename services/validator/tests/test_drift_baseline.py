"""Every report carries the candidate's drift baseline, from runs the validation makes anyway:
an encoder's pooled embeddings of the evaluation texts, a decoder's log-probabilities of its
greedy tokens on the evaluation prompts - recomputed here independently and compared."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops.evaldata import default_records
from slmops.events import OptimizationCompleted
from slmops.events.payloads import PassSpec, Recipe
from slmops.generation import DecoderEngine, Sampling
from slmops.profiles import DeviceProfile
from slmops.telemetry.drift import embedding_moments, token_logprobs
from slmops.testing.models import tiny_encoder_onnx, with_word_tokenizer
from slmops_validator.validate import Subject, validate

Profile = Callable[..., DeviceProfile]

pytestmark = [pytest.mark.integration]


def _completed(candidate: Any, reference: Any) -> OptimizationCompleted:
    recipe = Recipe(name="as-is", passes=[PassSpec(name="convert")])
    return OptimizationCompleted(
        model_name="m", version="1", variant_id="v-cand", device_class="test-cpu",
        parent_digest=reference.digest, recipe=recipe, artifact=candidate, duration_s=0.0,
        reference=reference,
    )  # fmt: skip


async def test_an_encoders_baseline_is_the_signature_of_its_pooled_eval_embeddings(
    judge: Any, cpu_profile: Profile
) -> None:
    # setup: a tiny encoder with a word tokenizer (the built-in set's texts are w0..w499 words
    # for it: unknown words map to [UNK]) and a slightly different reference
    data = with_word_tokenizer(tiny_encoder_onnx())
    candidate = await judge.put(data)
    reference = await judge.put(with_word_tokenizer(tiny_encoder_onnx(seed=8)))

    # execute
    report = await validate(Subject(_completed(candidate, reference), "feature-extraction", None),
                            cpu_profile(measurable=False), judge.cache, judge.settings)  # fmt: skip

    # assert: the moments of the candidate's mean-pooled embeddings, recomputed with plain ORT
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    baseline = report.drift_baseline
    assert baseline is not None
    assert baseline.embedding is not None
    assert baseline.logprobs is None
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    tokenizer = Tokenizer.from_str(meta["slmops.tokenizer"])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    texts = [r.text for r in default_records()[: judge.settings.eval_max_examples]]
    pooled = []
    for text in texts:
        ids = np.asarray([tokenizer.encode(text).ids], dtype=np.int64)
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        pooled.append(hidden[0].mean(axis=0))
    expected = embedding_moments(np.stack(pooled))
    assert report.eval_set is not None
    assert baseline.embedding.count == report.eval_set.examples == len(texts)
    assert baseline.embedding.dims == 64
    np.testing.assert_allclose(baseline.embedding.sums, expected.sums, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(baseline.embedding.sumsq, expected.sumsq, rtol=1e-4, atol=1e-4)


async def test_a_decoders_baseline_is_the_signature_of_its_greedy_token_logprobs(
    judge: Any, tiny_decoder: Path, cpu_profile: Profile
) -> None:
    # setup: a generation-ready decoder, judged against itself (latency not measured here)
    artifact = await judge.put(tiny_decoder.read_bytes())
    profile = cpu_profile(measurable=False)

    # execute
    report = await validate(Subject(_completed(artifact, artifact), "text-generation", None),
                            profile, judge.cache, judge.settings)  # fmt: skip

    # assert: the same greedy generations, with the SDK's engine here, give the same signature
    baseline = report.drift_baseline
    assert baseline is not None
    assert baseline.logprobs is not None
    assert baseline.embedding is None
    engine = DecoderEngine.load(tiny_decoder, judge.settings.scratch_dir / "engine")
    load = profile.generation
    texts = [r.text for r in default_records()[: judge.settings.eval_max_examples]]
    encoded = (engine.codec.encode(t, add_special_tokens=True) for t in texts)
    prompts = [ids for ids in encoded if ids]
    logprobs: list[float] = []
    for prompt in prompts[: load.agreement_prompts]:
        run = engine.generate(prompt[: load.prompt_tokens],
                              Sampling(max_new_tokens=load.agreement_tokens, temperature=0),
                              with_logprobs=True)  # fmt: skip
        list(run)
        logprobs += run.logprobs
    expected = token_logprobs(logprobs)
    assert 0 < baseline.logprobs.count <= load.agreement_prompts * load.agreement_tokens
    assert baseline.logprobs.count == expected.count
    assert baseline.logprobs.counts == expected.counts
    assert baseline.logprobs.sum == pytest.approx(expected.sum, rel=1e-4)
