"""The probe: load, smoke-test, memory and latency of one variant, in a child process.

Run as ``python -m slmops_validator.probe SPEC.json``; prints one JSON line. A child process
because (1) a model that crashes ONNX Runtime at load takes only the probe down, never the
service; (2) peak RSS growth is only honest in a process that loaded nothing else; (3) latency
must not share a process with parity runs. Latency runs hold a host-wide file lock: one latency
measurement at a time per host, whichever process asks (a queue, not parallel runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def main(spec_path: str) -> dict[str, Any]:
    spec = json.loads(Path(spec_path).read_text())
    import onnxruntime as ort
    import psutil

    if spec.get("generation"):  # a generation-ready decoder: measured as a gateway serves it
        from slmops_validator.genprobe import generation_probe

        generated = generation_probe(spec, _reset_peak_rss, _peak_rss_bytes)
        generated.update(ort_version=ort.__version__, providers=spec["providers"])
        if "load_error" not in generated and "run_error" not in generated:
            generated.update(_smoke_only(spec, ort))
        return generated

    _reset_peak_rss()  # the peak inherited from the parent across fork/exec is not ours
    rss_before = psutil.Process().memory_info().rss
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    result: dict[str, Any] = {"ort_version": ort.__version__, "providers": spec["providers"]}
    try:
        candidate = ort.InferenceSession(spec["candidate"], options, providers=spec["providers"])
    except Exception as exc:  # ORT refuses the model: a verdict, not a probe failure
        result["load_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return result
    smoke = dict(np.load(spec["smoke_feed"]))
    latency_feed = dict(np.load(spec["latency_feed"]))
    try:
        outputs = candidate.run(None, _restrict(smoke, candidate))
        candidate.run(None, _restrict(latency_feed, candidate))
    except Exception as exc:
        result["run_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return result
    result["peak_memory_mb"] = max(0.0, (_peak_rss_bytes() - rss_before) / 1e6)
    result["outputs"] = _describe(candidate, outputs)
    if spec.get("reference") and spec.get("measure_latency"):
        reference = ort.InferenceSession(spec["reference"], options, providers=spec["providers"])
        with host_lock(spec["lock_path"]) as waited_s:
            result["latency"] = _interleaved(candidate, reference, latency_feed, spec)
            result["latency"]["lock_wait_s"] = waited_s
    return result


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, the peak RSS, to the current RSS."""
    # Not Linux, or not allowed: ru_maxrss below may then include the parent's peak.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _restrict(feed: dict[str, np.ndarray], session: Any) -> dict[str, np.ndarray]:
    return {i.name: feed[i.name] for i in session.get_inputs()}


def _smoke_only(spec: dict[str, Any], ort: Any) -> dict[str, Any]:
    """The plain-session smoke run of a decoder (a whole window, empty cache): its outputs'
    shapes and non-finite values, after the memory was measured."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.log_severity_level = 3
    session = ort.InferenceSession(spec["candidate"], options, providers=spec["providers"])
    smoke = dict(np.load(spec["smoke_feed"]))
    try:
        outputs = session.run(None, _restrict(smoke, session))
    except Exception as exc:
        return {"run_error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    return {"outputs": _describe(session, outputs)}


def _describe(session: Any, outputs: list[Any]) -> list[dict[str, Any]]:
    return [
        {"name": o.name, "shape": list(v.shape), "non_finite": int((~np.isfinite(v)).sum())}
        for o, v in zip(session.get_outputs(), outputs, strict=True)
    ]


@contextlib.contextmanager
def host_lock(path: str) -> Iterator[float]:
    """Hold the host's latency lock; yields how long the wait for it was, in seconds."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w") as handle:
        started = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _interleaved(
    candidate: Any, reference: Any, feed: dict[str, np.ndarray], spec: dict[str, Any]
) -> dict[str, Any]:
    """Warm both up, then alternate which goes first, so drift hits both equally; more rounds
    while the p95 ratio's interval straddles its budget (``checks.noise``)."""
    from slmops_validator.checks.noise import paired_ratio

    feeds = {"candidate": _restrict(feed, candidate), "reference": _restrict(feed, reference)}
    sessions = {"candidate": candidate, "reference": reference}
    for _ in range(spec["warmup_runs"]):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {"candidate": [], "reference": []}
    rounds = 0
    while True:
        rounds += 1
        for i in range(spec["runs"]):
            order = ("candidate", "reference") if i % 2 == 0 else ("reference", "candidate")
            for name in order:
                started = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times[name].append((time.perf_counter() - started) * 1000.0)
        budget = spec.get("ratio_budget")
        if budget is None or rounds >= spec.get("max_rounds", 1):
            break
        estimate = paired_ratio(times["candidate"], times["reference"], quantile=0.95)
        if estimate.verdict(budget) != "within noise":
            break
    stats: dict[str, Any] = {
        "runs": len(times["candidate"]),
        "rounds": rounds,
        "tokens": int(feed["input_ids"].shape[1]),
        "candidate_ms": times["candidate"],
        "reference_ms": times["reference"],
    }
    for name, values in times.items():
        stats[f"{name}_p50_ms"] = float(np.percentile(values, 50))
        stats[f"{name}_p95_ms"] = float(np.percentile(values, 95))
    return stats


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
