"""Token generation with a generation-ready variant, on onnxruntime-genai's ``Generator``.

One :class:`DecoderEngine` per loaded variant; one :class:`Generation` per request, with its own
KV cache (the runtime allocates it per generator), so concurrent requests never share state.
The runtime loop - prefill, sampling, the KV buffer shared between past and present - runs in
C++; this module adds what a server needs around it: stop tokens beyond the model's eos (the
chat format's end-of-turn), ``max_new_tokens`` and the context limit, cancellation between
tokens, and the timings a health report carries (time to first token, decode tokens/s).

onnxruntime-genai holds the GIL while it computes a token: two requests in two threads take
turns token by token (correct, not parallel); on a small device the ONNX Runtime threads inside
one step use the cores anyway.

The runtime reads a folder (``genai_config.json`` + the graph): :meth:`DecoderEngine.load`
writes one, the graph and its weights split out of the variant once (``layout``), the config
taken from the variant's metadata and the threads from the caller.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.generation.layout import ensure_layout
from slmops.generation.spec import TOKENIZER_KEY, GenerationSpec
from slmops.generation.text import Codec
from slmops.onnxmeta import read_metadata


class NotGenerationReady(ValueError):
    """The model file carries no generation spec (an encoder, or a decoder exported without a
    KV cache by an older optimizer)."""


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the model's context length."""


@dataclass(frozen=True)
class Sampling:
    """OpenAI's knobs: temperature 0 is greedy; ``top_p`` 1 samples the whole distribution."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Generation:
    """Iterate for the generated token ids (stop tokens are not yielded); afterwards
    ``finish_reason`` is ``stop`` (a stop token), ``length`` (``max_new_tokens`` or the context
    is full) or ``cancelled``."""

    engine: DecoderEngine
    prompt_ids: list[int]
    sampling: Sampling
    cancelled: Callable[[], bool] = lambda: False
    finish_reason: str | None = None
    completion_ids: list[int] = field(default_factory=list)
    ttft_s: float | None = None  # prefill and the first token
    decode_s: float = 0.0  # every token after the first
    # The model's log-probability of each produced token (its own distribution, before any
    # temperature): a gateway's drift signature. Kept only when asked (~0.1 ms a token).
    with_logprobs: bool = False
    logprobs: list[float] = field(default_factory=list)

    def __iter__(self) -> Iterator[int]:
        import numpy as np
        import onnxruntime_genai as og

        engine, sampling = self.engine, self.sampling
        max_length = min(len(self.prompt_ids) + sampling.max_new_tokens, engine.context_length)
        params = og.GeneratorParams(engine.model)
        options: dict[str, Any] = {"max_length": max_length, "do_sample": not sampling.greedy}
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.seed is not None:
                options["random_seed"] = int(sampling.seed) & 0x7FFFFFFF
        params.set_search_options(**options)
        generator = og.Generator(engine.model, params)
        started = time.perf_counter()
        generator.append_tokens(np.asarray(self.prompt_ids, dtype=np.int32))
        while True:
            if self.cancelled():
                self.finish_reason = "cancelled"
                return
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            elapsed = time.perf_counter() - started
            if self.ttft_s is None:
                self.ttft_s = elapsed
            else:
                self.decode_s += elapsed
            if self.with_logprobs:
                self.logprobs.append(_logprob(generator.get_logits(), token))
            if token in engine.stop_ids:
                self.finish_reason = "stop"
                return
            self.completion_ids.append(token)
            yield token
            started = time.perf_counter()  # the consumer's time is not the engine's
            if len(self.completion_ids) >= sampling.max_new_tokens or generator.is_done():
                self.finish_reason = "length"
                return

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decoding (None with fewer than 2 tokens)."""
        later = len(self.completion_ids) - 1
        return later / self.decode_s if later > 0 and self.decode_s > 0 else None


def _logprob(logits: Any, token: int) -> float:
    """log softmax(logits)[token], stably (logits of the next token, shape [1, 1, vocab])."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    top = float(row.max())
    return float(row[token]) - top - float(np.log(np.exp(row - top).sum()))


class DecoderEngine:
    """A loaded generation-ready variant: its runtime model, tokenizer and spec."""

    def __init__(self, model: Any, spec: GenerationSpec, codec: Codec) -> None:
        self.model = model
        self.spec = spec
        self.codec = codec
        self.stop_ids = frozenset(spec.stop_token_ids)
        self.context_length = spec.context_length

    @classmethod
    def load(cls, model_path: Path, runtime_dir: Path, *, threads: int = 1) -> DecoderEngine:
        """Load the variant file ``model_path``; ``runtime_dir`` gets the runtime's folder
        (created, or refreshed when it exists). Raises :class:`NotGenerationReady`."""
        import onnxruntime_genai as og

        metadata = read_metadata(model_path)
        spec = GenerationSpec.from_metadata(metadata)
        if spec is None or TOKENIZER_KEY not in metadata:
            raise NotGenerationReady(
                f"{model_path.name} is not a generation-ready decoder (no generation spec or "
                "tokenizer in its metadata): re-optimize it with this version's optimizer"
            )
        if spec.runtime != "onnxruntime-genai":
            raise NotGenerationReady(f"unknown runtime {spec.runtime!r}")
        write_runtime_folder(model_path, runtime_dir, spec, threads=threads)
        model = og.Model(str(runtime_dir))
        return cls(model, spec, Codec(metadata[TOKENIZER_KEY]))

    def generate(
        self,
        prompt_ids: Sequence[int],
        sampling: Sampling,
        cancelled: Callable[[], bool] | None = None,
        *,
        with_logprobs: bool = False,
    ) -> Generation:
        """A generation to iterate; :class:`PromptTooLong` when no token would fit;
        ``with_logprobs``: keep each produced token's log-probability (``logprobs``)."""
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens; the model's context holds "
                f"{self.context_length}"
            )
        return Generation(self, list(prompt_ids), sampling, cancelled or (lambda: False),
                          with_logprobs=with_logprobs)  # fmt: skip

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation (shadow agreement, the validator's gates)."""
        run = self.generate(prompt_ids, Sampling(max_new_tokens=max_new_tokens, temperature=0))
        return list(run)


def write_runtime_folder(
    model_path: Path, runtime_dir: Path, spec: GenerationSpec, *, threads: int
) -> Path:
    """``runtime_dir`` with the runtime's config and the variant's graph and weights laid out
    as the runtime loads them best (``slmops.generation.layout``)."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    graph = ensure_layout(model_path, runtime_dir)
    config = json.loads(json.dumps(spec.runtime_config))  # a deep copy
    decoder = config["model"]["decoder"]
    decoder["filename"] = graph.name
    session = decoder.setdefault("session_options", {})
    session.update(intra_op_num_threads=threads, inter_op_num_threads=1, log_severity_level=3)
    config.setdefault("search", {})["max_length"] = spec.context_length
    (runtime_dir / "genai_config.json").write_text(json.dumps(config, indent=1))
    return runtime_dir
