"""Every class that has a recipe for a model gets a release: for every device profile in
``deploy/profiles`` and every candidate recipe the planner plans for a model, the real
:class:`~slmops_optimizer.runner.JobRunner` (in-process, moto S3, as ``bench/optimizer/jobs.py``
runs it) produces a variant, and the validator's :class:`StructureCheck` passes every gate of
the same profile on it.

Why this test: a recipe that a profile plans but whose output the same profile's structure
gates reject (an operator the class cannot run, a precision it does not run, an opset out of
range, an invalid graph) is a class that never gets a release - found only when a real model
is published. Tiny models of both families make every (profile x recipe) pair cheap:

- a tiny BERT-like encoder (``BertModel`` from a config, random weights, WordPiece tokenizer),
  Hugging Face folder, ``feature-extraction``;
- the tiny llama GGUF of ``services/optimizer/tests/archs`` (mixed Q4/Q5/Q6/Q8 and K-quant
  blocks, byte-level BPE, chat template), ``text-generation``;
- the same llama as a Hugging Face folder (dequantized weights), ``text-generation``.

Each model is one session fixture (written and published once); each job is one test, so a
failing (profile, recipe) names itself. Conversions are cached per source by the workspace, as
on a compute replica. The plan itself comes from the optimizer's planner
(:func:`~slmops_optimizer.plans.plan_jobs`); classes it plans nothing for must say why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from slmops.events.payloads import ArtifactRef, ModelPublished
from slmops.objectstore import ObjectStore
from slmops.profiles import DeviceProfile, load_profiles
from slmops.testing.s3 import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY
from slmops_optimizer.jobspec import JobSpec
from slmops_optimizer.plans import plan_jobs
from slmops_optimizer.settings import OptimizerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO / "deploy" / "profiles"
TINY_ARCHS = REPO / "services" / "optimizer" / "tests" / "archs" / "tiny_archs.py"


@dataclass(frozen=True)
class Model:
    """One tiny source the table covers."""

    name: str
    fmt: str
    task: str


MODELS = (
    Model("tiny-bert", "hf-safetensors", "feature-extraction"),
    Model("tiny-llama-gguf", "gguf", "text-generation"),
    Model("tiny-llama-hf", "hf-safetensors", "text-generation"),
)
PROFILES: dict[str, DeviceProfile] = load_profiles(PROFILES_DIR)


def _cases() -> list[Any]:
    """(model, class, recipe) for every candidate recipe that applies: what the planner must
    plan, known at collection time so each job is a test of its own."""
    return [
        pytest.param(model, name, candidate.name, id=f"{model.name}/{name}/{candidate.name}")
        for model in MODELS
        for name, profile in sorted(PROFILES.items())
        for candidate in profile.candidates(model.fmt, model.task)
    ]


# -- the tiny models -----------------------------------------------------------------------------


def _tiny_archs() -> ModuleType:
    name = "slmops_tests_tiny_archs"  # the same name the archs conftest registers
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TINY_ARCHS)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT encoder (hidden 64) with a WordPiece vocabulary of the built-in texts'
    words, saved as transformers saves it."""
    import re

    import torch
    import transformers

    from slmops.evaldata import default_texts

    words = sorted({w for t in default_texts() for w in re.findall(r"[a-z]+", t.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(".,;:!?'-()0123456789")
    vocab += [w for w in words if w not in vocab][:300]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.model_max_length = 128
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class Published:
    """A tiny model written, published to the store, and planned."""

    model: Model
    path: Path
    artifact: ArtifactRef
    jobs: dict[tuple[str, str], JobSpec]  # (class, recipe) → the planner's job
    skipped: dict[str, str]  # class → why the planner planned nothing


@dataclass
class Bench:
    store: ObjectStore
    workspace: Any  # slmops_optimizer.workspace.Workspace
    downloads: Path
    settings: OptimizerSettings
    rows: list[dict[str, Any]]

    def publish(self, model: Model, path: Path) -> Published:
        from slmops.cli.packaging import pack_directory

        if path.is_dir():
            tar = self.downloads / f"{model.name}.tar"
            with tar.open("wb") as out:
                pack_directory(path, out)
            blob = self.store.put_file(tar)
        else:
            blob = self.store.put_file(path)
        artifact = ArtifactRef(digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri)
        published = ModelPublished(
            model_name=model.name, version="1.0.0", format=model.fmt, task=model.task,
            artifact=artifact,
        )  # fmt: skip
        specs, skipped = plan_jobs(published, PROFILES, self.settings)
        jobs = {(s.device_class, s.recipe.name): s for s in specs}
        return Published(model, path, artifact, jobs, skipped)


@pytest.fixture(scope="session")
def bench(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    """The store (its own bucket on the session's moto server), a replica workspace, and the
    table every job adds its row to (printed at the end: ``pytest -s``)."""
    from slmops_optimizer.workspace import Workspace

    store = ObjectStore(
        endpoint_url=s3_server,
        region=TEST_REGION,
        bucket=f"slmops-recipes-{uuid.uuid4().hex[:12]}",
        access_key_id=TEST_ACCESS_KEY,
        secret_access_key=TEST_SECRET_KEY,
    )
    store.ensure_bucket()
    root = tmp_path_factory.mktemp("recipe-structure")
    settings = OptimizerSettings(job_threads=2, max_source_size_mb=4096)
    bench = Bench(store, Workspace(root / "workspace", store), root, settings, [])
    try:
        yield bench
    finally:
        store.close()
        if bench.rows:
            (root / "table.json").write_text(json.dumps(bench.rows, indent=1))
            print("\n" + _table(bench.rows))


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["model | class | recipe | job | structure | seconds", "---|---|---|---|---|---"]
    for row in sorted(rows, key=lambda r: (r["model"], r["class"], r["recipe"])):
        lines.append(
            f"{row['model']} | {row['class']} | {row['recipe']} | {row['job']} | "
            f"{row['structure']} | {row['seconds']:.1f}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tiny_bert(bench: Bench) -> Published:
    return bench.publish(MODELS[0], write_tiny_bert(bench.downloads / "tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_gguf(bench: Bench) -> Published:
    archs = _tiny_archs()
    tiny = archs.write_tiny_gguf(archs.ARCHS["llama"], bench.downloads / "tiny-llama.gguf")
    return bench.publish(MODELS[1], tiny.path)


@pytest.fixture(scope="session")
def tiny_llama_hf(bench: Bench, tiny_llama_gguf: Published) -> Published:
    """The same llama as a Hugging Face folder: dequantized weights, the GGUF's tokenizer and
    chat template, written by transformers."""
    from slmops_optimizer.gguf.loader import save_gguf_as_hf

    folder = save_gguf_as_hf(tiny_llama_gguf.path, bench.downloads / "tiny-llama-hf")
    return bench.publish(MODELS[2], folder)


@pytest.fixture
def published(request: pytest.FixtureRequest) -> Published:
    model: Model = request.node.callspec.params["model"]
    fixture = model.name.replace("-", "_")
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


# -- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_the_planner_plans_every_applicable_recipe_and_says_why_not(
    model: Model, published: Published
) -> None:
    expected = {
        (name, c.name) for name, p in PROFILES.items() for c in p.candidates(model.fmt, model.task)
    }
    assert set(published.jobs) == expected
    planned_classes = {name for name, _ in expected}
    assert set(published.skipped) == set(PROFILES) - planned_classes
    for name, reason in published.skipped.items():
        assert f"no recipe of {name} applies to {model.fmt} {model.task}" in reason


# -- every job: a variant, and the class's structure gates pass on it -------------------------


#: Known failures, each reported with its cause; strict, so a fix turns them into errors to
#: remove from here. Keyed by test id.
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize(("model", "device_class", "recipe"), _cases())
def test_every_planned_recipe_yields_a_variant_its_class_accepts(
    model: Model, device_class: str, recipe: str, published: Published, bench: Bench,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    from slmops_optimizer.runner import JobRunner
    from slmops_validator.checks.structure import StructureCheck

    reason = KNOWN.get(request.node.callspec.id)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    spec = published.jobs[(device_class, recipe)]
    row: dict[str, Any] = {"model": model.name, "class": device_class, "recipe": recipe}
    bench.rows.append(row)
    steps: list[str] = []
    started = time.monotonic()
    try:
        # ONNX Runtime's calibrators print progress to stdout
        with contextlib.redirect_stdout(io.StringIO()):
            result = JobRunner(bench.workspace).run(
                spec, lambda _f, step: steps.append(step), lambda: False
            )
    except Exception as exc:
        row.update(job=f"FAILED at '{steps[-1] if steps else '?'}': {exc}", structure="-",
                   seconds=time.monotonic() - started)  # fmt: skip
        raise
    row["seconds"] = time.monotonic() - started
    passes = " + ".join(p.name for p in result.effective_recipe.passes)
    row["job"] = f"ok ({result.size_bytes / 1e6:.2f} MB; {passes})"
    row["tries"] = [
        f"{e.change}: {e.quality_metric} {e.quality:.3f}{' (floor met)' if e.meets_floor else ''}"
        for e in result.trail
    ]
    row["log"] = result.log

    variant = bench.downloads / f"{result.job_id}.onnx"
    bench.store.get_to_file(result.artifact_digest, variant)
    outcome, _ = StructureCheck().run(variant, PROFILES[device_class])
    failed = [f"{g.name} = {g.value} ({g.detail})" for g in outcome.gates if g.passed is False]
    row["structure"] = "pass" if not failed else "FAIL: " + "; ".join(failed)
    assert not failed, f"{device_class} / {recipe} on {model.name}: {failed}"
    assert {g.name for g in outcome.gates} >= {
        "structure.onnx_checker", "structure.opset", "structure.unsupported_operators",
        "structure.disallowed_precisions",
    }  # fmt: skip
