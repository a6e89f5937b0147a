"""The probe's decoder half: what a user of a generation-ready variant feels, in the child.

Run by :mod:`slmops_validator.probe` when the spec asks for generation. Everything goes through
the SDK's :class:`~slmops.generation.DecoderEngine`, the very code a gateway serves with:

1. peak memory: the candidate loaded and a generation set up for the class's whole context
   (the runtime allocates the KV cache for it up front) - before anything else is loaded;
2. speed (holding the host's latency lock, only where the host stands for the class): time to
   first token at the class's prompt length and time per decoded token, candidate and fp32
   reference in interleaved pairs, more rounds while the ratio is within noise of its budget;
3. greedy agreement: the first ``agreement_tokens`` greedy tokens of the candidate and the
   reference on each evaluation prompt; the log-probability of each of the candidate's tokens
   is kept on the way (the report's drift baseline: what a gateway's served tokens are
   compared with), at no extra model run.

A re-optimization's field probe times the candidate against the regressed variant instead of
the reference and skips the agreement (``generation.agreement`` false).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from slmops.generation import DecoderEngine, Sampling


def generation_probe(spec: dict[str, Any], reset_peak: Any, peak_bytes: Any) -> dict[str, Any]:
    import psutil

    gen = spec["generation"]
    runtime_root = Path(spec["scratch"])
    reset_peak()
    rss_before = psutil.Process().memory_info().rss
    result: dict[str, Any] = {}
    try:
        candidate = DecoderEngine.load(
            Path(spec["candidate"]), runtime_root / "candidate", threads=spec["threads"]
        )
    except Exception as exc:  # the runtime refuses the model: a verdict, not a probe failure
        result["load_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return result
    prompt = gen["speed_prompt"]
    context = min(gen["context_tokens"], candidate.context_length)
    try:
        whole_context = Sampling(max_new_tokens=max(2, context - len(prompt)), temperature=0)
        list(itertools.islice(candidate.generate(prompt, whole_context), 2))
    except Exception as exc:
        result["run_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return result
    result["peak_memory_mb"] = max(0.0, (peak_bytes() - rss_before) / 1e6)
    result["memory_context_tokens"] = context
    if spec.get("reference") is None:
        return result
    reference = DecoderEngine.load(
        Path(spec["reference"]), runtime_root / "reference", threads=spec["threads"]
    )
    if spec.get("measure_latency"):
        from slmops_validator.probe import host_lock

        with host_lock(spec["lock_path"]) as waited_s:
            result["speed"] = _speed(candidate, reference, prompt, gen, spec)
            result["speed"]["lock_wait_s"] = waited_s
    if gen.get("agreement", True):
        result["agreement"] = _agreement(candidate, reference, gen)
    return result


def _speed(
    candidate: DecoderEngine,
    reference: DecoderEngine,
    prompt: list[int],
    gen: dict[str, Any],
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Interleaved greedy runs: TTFT and time per output token (TPOT) per run, in ms."""
    from slmops_validator.checks.noise import paired_ratio

    engines = {"candidate": candidate, "reference": reference}
    sampling = Sampling(max_new_tokens=gen["new_tokens"], temperature=0)
    for engine in engines.values():  # warm-up: first-run allocations and prepacking
        list(engine.generate(prompt, sampling))
    series: dict[str, list[float]] = {
        f"{name}_{what}": [] for name in engines for what in ("ttft_ms", "tpot_ms")
    }
    rounds = 0
    while True:
        rounds += 1
        for i in range(gen["runs"]):
            order = list(engines) if i % 2 == 0 else list(reversed(engines))
            for name in order:
                run = engines[name].generate(prompt, sampling)
                tokens = sum(1 for _ in run)
                if run.ttft_s is None or tokens < 2:
                    raise RuntimeError(f"the {name} stopped after {tokens} tokens")
                series[f"{name}_ttft_ms"].append(run.ttft_s * 1000)
                series[f"{name}_tpot_ms"].append(run.decode_s * 1000 / (tokens - 1))
        budget = spec.get("ratio_budget")
        if budget is None or rounds >= gen["max_rounds"]:
            break
        new_tokens = gen["new_tokens"]
        estimate = paired_ratio(
            request_ms(series, "candidate", new_tokens),
            request_ms(series, "reference", new_tokens),
            quantile=0.5,
        )
        if estimate.verdict(budget) != "within noise":
            break
    return {
        **series,
        "rounds": rounds,
        "prompt_tokens": len(prompt),
        "new_tokens": gen["new_tokens"],
    }


def request_ms(series: dict[str, list[float]], who: str, new_tokens: int) -> list[float]:
    """Per run, the time of the whole request the class's load describes: the first token,
    then ``new_tokens - 1`` more at the run's pace."""
    return [
        ttft + (new_tokens - 1) * tpot
        for ttft, tpot in zip(series[f"{who}_ttft_ms"], series[f"{who}_tpot_ms"], strict=True)
    ]


def _agreement(
    candidate: DecoderEngine, reference: DecoderEngine, gen: dict[str, Any]
) -> dict[str, Any]:
    """Per prompt, how many leading greedy tokens the two models share; and the signature of
    the log-probabilities the candidate gave its own tokens."""
    from slmops.telemetry.drift import token_logprobs

    wanted = gen["agreement_tokens"]
    identical: list[int] = []
    logprobs: list[float] = []
    greedy = Sampling(max_new_tokens=wanted, temperature=0)
    for prompt in gen["prompts"]:
        run = candidate.generate(prompt, greedy, with_logprobs=True)
        ours = list(run)
        logprobs += run.logprobs
        theirs = reference.greedy(prompt, wanted)
        same = 0
        for a, b in zip(ours, theirs, strict=False):
            if a != b:
                break
            same += 1
        if same == len(ours) == len(theirs):
            same = wanted  # both stopped early on the same tokens: identical
        identical.append(same)
    return {
        "identical_tokens": identical,
        "agreement_tokens": wanted,
        "logprobs": token_logprobs(logprobs).model_dump(mode="json"),
    }
