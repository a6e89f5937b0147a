"""Validator: time per variant for both real models, and an independent parity cross-check.

One run starts moto's S3 server on 127.0.0.1 and runs the optimizer's real jobs (see
``variants.py``) to make the variants and their stored fp32 references. Then, per variant, it
builds the ``OptimizationCompleted`` event the optimizer publishes and calls the validator's
own ``validate()`` (the service's settings: 96 built-in texts or 64-token windows, ONNX
Runtime with 1 thread, the probe in a child process), one validation at a time, timed:

* the table splits the wall time into the report's checks: structure (ONNX checker),
  probe (load, smoke run, peak memory, and - for classes this host stands for - 40
  interleaved latency runs of candidate and fp32, 128 tokens), parity (both models over the
  evaluation set) and "other" (downloads into the model cache, tokenization, the rest);
  the first validation of a model also downloads its fp32 reference;
* cross-check: for the first variant of each model, the bench recomputes parity without the
  service's code (``crosscheck.py``) and prints both figures side by side;
* validations/hour per model = 3600 / mean wall time of one validation.

Nothing is asserted. ``SLMOPS_BENCH_QUICK=1``: one recipe per model.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.optimizer import host
from bench.optimizer.common import QUICK, Case, Job
from bench.optimizer.jobs import reference, s3_store
from bench.validator.crosscheck import Cross, crosscheck
from bench.validator.crosscheck import table as cross_table
from bench.validator.timing import Timed, table, throughput, validate_all
from bench.validator.variants import cases, optimize
from slmops_optimizer.workspace import Workspace
from slmops_validator.settings import ValidatorSettings

__all__ = ["main"]


def hf_tokenizer(case: Case, workspace: Workspace, jobs: list[Job]) -> Any:
    """The Hugging Face tokenizer from the source: MiniLM's folder, SmolLM2's conversion."""
    if case.fmt == "hf-safetensors":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(case.path, local_files_only=True)
    kept = reference(workspace, jobs)
    return None if kept is None else kept[1]


def main() -> None:
    started = time.monotonic()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    print(f"\nValidator{' (quick)' if QUICK else ''}: optimizer jobs, then validate() per "
          "variant...", flush=True)  # fmt: skip
    timed: list[Timed] = []
    crosses: list[Cross] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="slmops-bench-val-") as name:
        tmp = Path(name)
        with s3_store(tmp / "var") as store:
            workspace = Workspace(tmp / "work" / "replicas", store)
            settings = ValidatorSettings(work_dir=tmp / "validator")
            settings.scratch_dir.mkdir(parents=True, exist_ok=True)
            for case, recipes in cases():
                jobs = optimize(case, recipes, store, workspace, tmp)
                print(f"Validating {case.name}...", flush=True)
                mine = asyncio.run(validate_all(jobs, store, settings))
                timed += mine
                target = _most_lossy(mine)
                tokenizer = hf_tokenizer(case, workspace, jobs) if target else None
                if target is None or tokenizer is None:
                    skipped.append(f"{case.name}: no variant with parity figures or no "
                                   "tokenizer: not cross-checked")  # fmt: skip
                    continue
                print(f"Cross-checking {target.job.device_class} / {target.job.recipe}...",
                      flush=True)  # fmt: skip
                start = time.monotonic()
                crosses.append(crosscheck(target, tokenizer, store, tmp, settings))
                print(f"  done in {time.monotonic() - start:.0f} s", flush=True)
    print(f"\n{host()}")
    print(
        f"validator settings: {settings.threads} ONNX Runtime thread(s), "
        f"{settings.eval_max_examples} texts / windows of {settings.decoder_window_tokens} "
        f"tokens, encoders cut at {settings.eval_max_tokens} tokens, latency "
        f"{settings.latency_warmup_runs} warm-up + {settings.latency_runs} interleaved runs "
        f"of {settings.latency_tokens} tokens"
    )
    print("\n### Validation time per variant (wall seconds of validate(), split by check)\n")
    print("\n".join(table(timed)))
    print("\n### Parity cross-check: the service's figure vs the bench's own computation\n")
    print("\n".join(cross_table(crosses) + skipped))
    print("\n### Throughput\n")
    print("\n".join(throughput(timed)))
    print(f"\nValidator bench: {time.monotonic() - started:.0f} s in all")


def _most_lossy(timed: list[Timed]) -> Timed | None:
    """The variant furthest from its reference: the cross-check least likely to agree by luck."""
    scored = []
    for t in timed:
        gate = t.gate("parity.cosine_mean") or t.gate("parity.top1_agreement")
        if gate is not None and gate.value is not None:
            scored.append((gate.value, t.job.spec.job_id, t))
    return min(scored)[2] if scored else None
