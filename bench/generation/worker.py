"""One runtime in its own process, answering generation requests on stdin/stdout (JSON lines).

A process per runtime so each one's peak RSS is its own (VmHWM), and so the benchmark can
interleave requests between runtimes that are all loaded at once. Kinds:

- ``slmops``: the gateway's generation code in process (``slmops.generation.DecoderEngine``
  on a variant file: what ``/v1/chat/completions`` runs);
- ``llama.cpp``: llama-cpp-python on the GGUF file, greedy, the same token ids in;
- ``http``: the gateway's OpenAI-compatible streaming API on 127.0.0.1 (a real gateway app in
  this process, the variant installed in its slot), timed from the client side.

Request: ``{"prompt": [ids], "max_new_tokens": N}``; answer: ``{"tokens": [...], "ttft_ms":
..., "decode_tokens_per_s": ...}``; ``{"rss": true}`` answers the process's peak RSS in MB.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class SlmopsRuntime:
    def __init__(self, model: str, threads: int, scratch: str) -> None:
        from slmops.generation import DecoderEngine

        self.engine = DecoderEngine.load(Path(model), Path(scratch), threads=threads)

    def generate(self, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
        from slmops.generation import Sampling

        run = self.engine.generate(prompt, Sampling(max_new_tokens=max_new_tokens, temperature=0))
        tokens = list(run)
        return {
            "tokens": tokens,
            "ttft_ms": (run.ttft_s or 0.0) * 1000,
            "decode_tokens_per_s": run.decode_tokens_per_s,
        }


class LlamaCppRuntime:
    def __init__(self, model: str, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=model,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=context,
            n_batch=512,
            verbose=False,
            logits_all=False,
        )

    def generate(self, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
        self.llm.reset()
        started = time.perf_counter()
        first: float | None = None
        tokens: list[int] = []
        # Greedy, no penalties: top_k 1 picks the argmax as our temperature 0 does.
        for token in self.llm.generate(
            prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True
        ):
            now = time.perf_counter()
            if first is None:
                first = now
            if token == self.llm.token_eos() or len(tokens) >= max_new_tokens:
                break
            tokens.append(int(token))
            if len(tokens) >= max_new_tokens:
                break
        end = time.perf_counter()
        assert first is not None
        decode_s = end - first
        return {
            "tokens": tokens,
            "ttft_ms": (first - started) * 1000,
            "decode_tokens_per_s": (len(tokens) - 1) / decode_s if decode_s > 0 else None,
        }


def main() -> None:
    kind, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = sys.argv[4] if len(sys.argv) > 4 else ""
    runtime: Any
    if kind == "slmops":
        runtime = SlmopsRuntime(model, threads, extra)
    elif kind == "llama.cpp":
        runtime = LlamaCppRuntime(model, threads, int(extra or 1024))
    elif kind == "http":
        from bench.generation.http_runtime import HttpRuntime

        runtime = HttpRuntime(model, threads, extra)
    else:
        raise SystemExit(f"unknown runtime {kind!r}")
    print(json.dumps({"ready": True, "rss_mb": peak_rss_mb()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("rss"):
            answer: dict[str, Any] = {"peak_rss_mb": peak_rss_mb()}
        elif request.get("stop"):
            break
        else:
            answer = runtime.generate(request["prompt"], request["max_new_tokens"])
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
