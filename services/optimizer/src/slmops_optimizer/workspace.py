"""A compute replica's disk: downloaded sources and converted models, kept between jobs.

Every recipe of a model starts with ``convert``, so a version fanned out to 3 classes x 3
recipes would export the same model nine times; the replica converts once and reuses the
result (keyed by source digest and convert config, guarded by a file lock so two jobs do not
race). Sources are fetched once per digest and verified on the way in. Job folders are
temporary and removed whatever happens, with every temp file the passes wrote; they are named
after their process (:mod:`slmops.jobdirs`), so those of a replica that was killed mid-job are
removed when the next replica starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slmops.jobdirs import owned_dir, remove_orphaned
from slmops.objectstore import ObjectStore
from slmops_optimizer.jobspec import JobSpec
from slmops_optimizer.passes import PassError, SourceModel
from slmops_optimizer.passes.onnx_io import copy_model_files


class Workspace:
    def __init__(self, root: Path, store: ObjectStore) -> None:
        self.root = root
        self.store = store
        for sub in ("sources", "converted", "jobs", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # A replica starts with its service: folders of jobs whose process died go now.
        remove_orphaned(root / "jobs")

    @contextmanager
    def job_dir(self, job_id: str) -> Iterator[Path]:
        with owned_dir(self.root / "jobs", job_id) as folder:
            yield folder

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with (self.root / "locks" / f"{key}.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def source(self, spec: JobSpec) -> SourceModel:
        """The parent artifact, downloaded (verified) and unpacked once per digest."""
        size_mb = spec.parent.size_bytes / 1e6
        if size_mb > spec.max_source_size_mb:
            raise PassError(
                f"the model is {size_mb:.1f} MB, over the optimizer's limit of "
                f"{spec.max_source_size_mb:g} MB (SLMOPS_OPTIMIZER_MAX_SOURCE_SIZE_MB)"
            )
        hex_digest = spec.parent.digest.removeprefix("sha256:")
        folder = self.root / "sources" / hex_digest
        with self._locked(f"source-{hex_digest}"):
            if not (folder / ".complete").exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                _fetch_and_unpack(self.store, spec, folder)
                (folder / ".complete").touch()
        names = {"onnx": "model.onnx", "gguf": "model.gguf", "hf-safetensors": "model"}
        return SourceModel(spec.format, folder / names[spec.format], spec.task, spec.parent.digest)

    @contextmanager
    def converted(self, source: SourceModel, convert_config: dict[str, Any]) -> Iterator[Path]:
        """Hold the lock of one conversion; yields its cache folder (empty if not done yet)."""
        key = hashlib.sha256(
            json.dumps([source.digest, convert_config], sort_keys=True).encode()
        ).hexdigest()[:32]
        folder = self.root / "converted" / key
        with self._locked(f"converted-{key}"):
            yield folder


def _fetch_and_unpack(store: ObjectStore, spec: JobSpec, folder: Path) -> None:
    download = folder / "artifact"
    store.get_to_file(spec.parent.digest, download)
    if spec.format == "gguf":
        download.rename(folder / "model.gguf")
        return
    if spec.format == "onnx" and not tarfile.is_tarfile(download):
        download.rename(folder / "model.onnx")
        return
    unpacked = folder / "unpacked"
    try:
        with tarfile.open(download) as tar:
            # The "data" filter refuses absolute paths, links out of the folder, devices.
            tar.extractall(unpacked, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise PassError(f"the {spec.format} archive cannot be unpacked: {exc}") from exc
    finally:
        download.unlink(missing_ok=True)
    if spec.format == "onnx":  # a tar of an ONNX model with its external data
        models = sorted(unpacked.rglob("*.onnx"))
        if len(models) != 1:
            raise PassError(f"the ONNX archive must hold exactly one .onnx file, not {len(models)}")
        for item in models[0].parent.iterdir():  # external data stays beside its model
            item.rename(folder / ("model.onnx" if item == models[0] else item.name))
        return
    # The registry accepts config.json at the root or in one top-level folder.
    roots = [p.parent for p in unpacked.glob("config.json")] or [
        p.parent for p in unpacked.glob("*/config.json")
    ]
    if len(roots) != 1:
        raise PassError("the Hugging Face archive has no single folder with a config.json")
    roots[0].rename(folder / "model")


def save_converted(
    folder: Path, model_path: Path, tokenizer: Any, metrics: dict[str, float]
) -> None:
    """Keep a conversion (the graph hard-linked when the disk allows: no second copy)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    copy_model_files(model_path.parent, tmp / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_converted(folder: Path) -> tuple[Path, Any, dict[str, float]] | None:
    """(model path, tokenizer or None, convert metrics) of a kept conversion, if any."""
    model = folder / "model" / "model.onnx"
    if not model.is_file():
        return None
    tokenizer = None
    if (folder / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    return model, tokenizer, metrics
