"""Shadow agreement after a rollout's install: does the new model say what the old one said?

On a sampled share of requests (``shadow_sample_rate``, only while the installed model is on
trial), once the answer has been sent, the previous model runs on the same input and the two
are compared; the health report carries the mean, and the rollout's gate judges it.

- Decoders: both models continue the same prompt greedily for ``shadow_tokens`` tokens;
  agreement = identical leading tokens / N. An end of turn is a position too, so two models
  that both answer "Paris." and stop agree fully. The served answer's own tokens are reused
  when it was greedy and long enough (or ended its turn), so most samples cost one run.
- Encoders (``/v1/embeddings``): the cosine of old and new embeddings, clipped to [0, 1].

Shadow work never waits for a turn: it runs only if a generation slot is free right now
(holding it for those N tokens) and is skipped otherwise, so a busy gateway serves its callers
first and samples less.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Sequence

import numpy as np

from slmops.generation import DecoderEngine, Sampling
from slmops_gateway.agent import Agent
from slmops_gateway.pool import GenerationPool
from slmops_gateway.serving import Job, Outcome
from slmops_gateway.slots import LoadedModel

log = logging.getLogger(__name__)
END = -1  # the position after a sequence that ended early (end of turn, full context)


class Stopped(Exception):
    """The service stopped while a comparison ran."""


def _sampled(agent: Agent) -> LoadedModel | None:
    """The previous model, if this request is one to shadow."""
    previous = agent.slots.previous
    rate = agent.settings.shadow_sample_rate
    if not agent.shadowing or previous is None or rate <= 0:
        return None
    return previous if random.random() < rate else None  # noqa: S311 - sampling, not secrets


def leading_agreement(new: Sequence[int], old: Sequence[int], n: int) -> float:
    """Identical leading tokens of two length-``n`` sequences, over ``n``."""
    same = 0
    for a, b in zip(new[:n], old[:n], strict=False):
        if a != b:
            break
        same += 1
    return same / n


def greedy_prefix(
    engine: DecoderEngine, prompt_ids: list[int], n: int, cancel: threading.Event
) -> list[int]:
    """The first ``n`` greedy tokens, padded with :data:`END` after an early end."""
    run = engine.generate(prompt_ids, Sampling(max_new_tokens=n, temperature=0), cancel.is_set)
    tokens = list(run)
    if run.finish_reason == "cancelled":
        raise Stopped("the service stops")
    return tokens + [END] * (n - len(tokens))


def _served_greedy(job: Job, outcome: Outcome, n: int) -> list[int] | None:
    """The served answer's first ``n`` greedy tokens, if it has them."""
    if not job.sampling.greedy:
        return None
    ids = outcome.completion_ids
    if len(ids) >= n:
        return ids[:n]
    if outcome.stopped_by_token:
        return ids + [END] * (n - len(ids))
    return None  # cut short by a stop string or max_tokens: generate N greedily


def _compare(job: Job, previous: DecoderEngine, new: list[int] | None, n: int,
             cancel: threading.Event) -> float:  # fmt: skip
    if job.prompt_text is None:
        old_prompt = job.prompt_ids
    else:  # the same text through the previous model's own tokenizer
        special = job.add_special_tokens
        old_prompt = previous.codec.encode(job.prompt_text, add_special_tokens=special)
    old = greedy_prefix(previous, old_prompt, n, cancel)
    if new is None:
        new = greedy_prefix(job.engine, job.prompt_ids, n, cancel)
    return leading_agreement(new, old, n)


def _record(agent: Agent, what: str, future: asyncio.Future[float | list[float]]) -> None:
    if future.cancelled() or future.exception() is not None:
        log.info("shadow comparison (%s) not made: %s", what,
                 "cancelled" if future.cancelled() else future.exception())  # fmt: skip
        return
    result = future.result()
    for value in result if isinstance(result, list) else [result]:
        agent.health.record_shadow(value)


async def after_generation(
    agent: Agent, pool: GenerationPool, job: Job, outcome: Outcome | None
) -> None:
    """Run after a generation's answer was sent: compare with the previous model, if sampled
    and a slot is free (the comparison goes on in a worker; this returns at once)."""
    if outcome is None or outcome.finish_reason == "cancelled":
        return
    previous = _sampled(agent)
    if previous is None or previous.engine is None:
        return
    n = agent.settings.shadow_tokens
    new = _served_greedy(job, outcome, n)
    engine = previous.engine
    started = pool.try_submit(lambda cancel: _compare(job, engine, new, n, cancel))
    if started is None:
        log.debug("shadow comparison skipped: every generation slot is busy")
        return
    started[0].add_done_callback(lambda f: _record(agent, "decoder", f))  # type: ignore[arg-type]


async def after_embedding(
    agent: Agent, pool: GenerationPool, texts: list[str], vectors: np.ndarray
) -> None:
    """Run after an embeddings answer was sent: cosine of the previous model's embeddings."""
    previous = _sampled(agent)
    if previous is None or previous.embedding is None or previous.session is None:
        return

    def compare(_: threading.Event) -> list[float]:
        before, _tokens = previous.embed(texts)
        if before.shape != vectors.shape:
            return [0.0] * len(texts)
        pairs = zip(vectors, before, strict=True)
        return [float(np.clip(np.dot(a, b), 0.0, 1.0)) for a, b in pairs]

    started = pool.try_submit(compare)
    if started is None:
        log.debug("shadow comparison skipped: every generation slot is busy")
        return
    started[0].add_done_callback(lambda f: _record(agent, "encoder", f))  # type: ignore[arg-type]
