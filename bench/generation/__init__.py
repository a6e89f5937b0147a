"""Generation side by side with llama.cpp: what a gateway's chat user gets from each runtime.

For SmolLM2-135M-Instruct (GGUF Q4_1, llama) and Gemma 3 270M (GGUF Q4_K_M, gemma3): the
optimizer's real jobs make the fp32 generation graph and the exact-GGUF variants (one per
mapping form measured), then every runtime runs in its own process (so its peak RSS is its
own) and answers the same greedy requests - 64 prompt tokens in, 128 out, 2 threads - one
prompt at a time, interleaved across runtimes, the order rotating every prompt:

- ``slmops <variant>``: the gateway's generation code in process (``DecoderEngine``);
- ``llama.cpp``: llama-cpp-python on the very GGUF file (``make bench`` builds it);
- ``gateway HTTP``: the gateway's ``/v1/completions`` with ``stream: true``, timed by a client
  on 127.0.0.1 (the API's overhead over the in-process figures).

Columns: time to first token and decode tokens/s (medians), peak RSS, and the greedy output
against the fp32 graph of the same weights: share of prompts whose first 32 tokens are
identical, and the mean identical prefix. Ratios are to llama.cpp, measured in the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.generation.models import BenchModel, bench_models, prepare

THREADS = 2
PROMPT_TOKENS = 64
NEW_TOKENS = 128
PROMPTS = 8
AGREEMENT_TOKENS = 32


@dataclass
class Runtime:
    label: str
    kind: str  # slmops / llama.cpp / http
    model: Path
    extra: str = ""
    process: Any = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.generation.worker", self.kind, str(self.model),
             str(THREADS), self.extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
        )  # fmt: skip
        self._read()  # {"ready": true}

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} exited (code {self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self.process is None:
            return
        self.peak_rss_mb = self.ask({"rss": True})["peak_rss_mb"]
        self.ask_stop()

    def ask_stop(self) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"stop": True}) + "\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    print("\n== generation vs llama.cpp (64 tokens in, 128 out, greedy, 2 threads) ==", flush=True)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("(llama-cpp-python is not installed: `python -m bench.install_llama_cpp`)")
        return
    work = Path(os.environ.get("SLMOPS_BENCH_DIR", "var/bench/generation")).resolve()
    for model in bench_models():
        prepared = prepare(model, work)
        if prepared is None:
            continue
        _measure(model, prepared, work)


def _measure(model: BenchModel, files: dict[str, Path], work: Path) -> None:
    from slmops.evaldata import default_texts
    from slmops.generation import Codec
    from slmops.onnxmeta import read_metadata

    codec = Codec(read_metadata(files["fp32"])["slmops.tokenizer"])
    prompts = []
    for text in default_texts():
        ids = codec.encode(text, add_special_tokens=True)
        if len(ids) >= PROMPT_TOKENS:
            prompts.append(ids[:PROMPT_TOKENS])
        if len(prompts) == PROMPTS:
            break
    scratch = Path(tempfile.mkdtemp(prefix="gen-", dir=work))
    runtimes = [Runtime("fp32 graph", "slmops", files["fp32"], str(scratch / "fp32"))]
    runtimes += [
        Runtime(f"slmops {label}", "slmops", path, str(scratch / label))
        for label, path in files.items()
        if label not in ("fp32", "gguf")
    ]
    runtimes.append(Runtime("llama.cpp", "llama.cpp", files["gguf"], "1024"))
    http_model = files.get(model.http_variant)
    if http_model is not None:
        runtimes.append(Runtime(f"gateway HTTP ({model.http_variant})", "http", http_model,
                                str(scratch / "http")))  # fmt: skip
    print(f"\n-- {model.name} ({model.gguf_type}), {len(prompts)} prompts --", flush=True)
    started = time.monotonic()
    for runtime in runtimes:
        runtime.start()
        runtime.ask({"prompt": prompts[0], "max_new_tokens": 16})  # warm-up
    for i, prompt in enumerate(prompts):
        shift = i % len(runtimes)
        for runtime in runtimes[shift:] + runtimes[:shift]:
            runtime.runs.append(runtime.ask({"prompt": prompt, "max_new_tokens": NEW_TOKENS}))
    for runtime in runtimes:
        runtime.stop()
    print(f"(measured in {time.monotonic() - started:.0f} s)")
    _table(runtimes)


def _table(runtimes: list[Runtime]) -> None:
    reference = runtimes[0]
    peer = next(r for r in runtimes if r.kind == "llama.cpp")
    peer_ttft = statistics.median(r["ttft_ms"] for r in peer.runs)
    peer_tps = statistics.median(r["decode_tokens_per_s"] for r in peer.runs)
    header = (f"{'runtime':34} {'TTFT ms':>8} {'x llama':>7} {'tok/s':>7} {'x llama':>7} "
              f"{'peak RSS MB':>11} {'x llama':>7} {'same 32':>8} {'mean same':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for runtime in runtimes:
        ttft = statistics.median(r["ttft_ms"] for r in runtime.runs)
        tps = statistics.median(r["decode_tokens_per_s"] or 0.0 for r in runtime.runs)
        agreement = f"{'(text)':>8} {'':>9}"  # the API streams text, not token ids
        if runtime.kind != "http":
            same = [
                _identical(r["tokens"], ref["tokens"])
                for r, ref in zip(runtime.runs, reference.runs, strict=True)
            ]
            share = sum(n >= AGREEMENT_TOKENS for n in same) / len(same)
            agreement = f"{share:8.0%} {statistics.mean(same):9.1f}"
        print(f"{runtime.label:34} {ttft:8.1f} {ttft / peer_ttft:7.2f} {tps:7.1f} "
              f"{tps / peer_tps:7.2f} {runtime.peak_rss_mb:11.0f} "
              f"{runtime.peak_rss_mb / peer.peak_rss_mb:7.2f} {agreement}")  # fmt: skip


def _identical(ours: list[int], theirs: list[int]) -> int:
    same = 0
    for a, b in zip(ours[:AGREEMENT_TOKENS], theirs[:AGREEMENT_TOKENS], strict=False):
        if a != b:
            break
        same += 1
    return same
