"""One tiny GGUF per architecture (see ``tiny_archs.py``) and the platform's path on it, built
once per session and shared by every test of that architecture.

Each :class:`ArchCase` runs the stages lazily, in order, and keeps a stage's result - or its
exception, raised again in every test that needs it - so one broken stage fails its own tests
with the real error instead of taking the whole session down: written file → transformers'
GGUF loader (:func:`load_gguf_causal_lm`) → Hugging Face folder → onnxruntime-genai's builder
graph, stamped (:func:`write_generation_file`) → its generation spec.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def load_tiny_archs() -> ModuleType:
    """``tiny_archs.py`` beside this file (no test folder is on ``sys.path`` here)."""
    name = "slmops_tests_tiny_archs"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("tiny_archs.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


TINY = load_tiny_archs()


@dataclass
class ArchCase:
    """The platform's stages on one architecture's tiny GGUF, each computed once."""

    name: str
    root: Path
    _done: dict[str, tuple[Any, BaseException | None]] = field(default_factory=dict)

    @property
    def spec(self) -> Any:
        return TINY.ARCHS[self.name]

    def _stage(self, key: str, make: Callable[[], T]) -> T:
        if key not in self._done:
            try:
                self._done[key] = (make(), None)
            except Exception as exc:  # kept: every test of this stage reports it
                self._done[key] = (None, exc)
        value, error = self._done[key]
        if error is not None:
            raise error
        return value  # type: ignore[no-any-return]

    def tiny(self) -> Any:
        """The written file and the torch model it holds (``tiny_archs.TinyGGUF``)."""
        return self._stage(
            "write", lambda: TINY.write_tiny_gguf(self.spec, self.root / f"{self.name}.gguf")
        )

    def loaded(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` from :func:`load_gguf_causal_lm`."""
        from slmops_optimizer.gguf.loader import load_gguf_causal_lm

        return self._stage("load", lambda: load_gguf_causal_lm(self.tiny().path, self.root))

    def hf_dir(self) -> Path:
        from slmops_optimizer.gguf.loader import save_hf_folder

        return self._stage("hf", lambda: save_hf_folder(*self.loaded(), self.root / "hf"))

    def generation_file(self) -> Path:
        """The stamped fp32 generation graph (one file, weights inline)."""
        from slmops_optimizer.generation.metadata import write_generation_file

        def build() -> Path:
            return write_generation_file(self.hf_dir(), self.root / "generation.onnx", self.root)

        return self._stage("build", build)

    def built_graph(self) -> Path:
        """The builder's own output (``model.onnx`` + external data), as ``convert`` leaves it."""
        self.generation_file()
        return self.root / "built" / "model.onnx"

    def generation_spec(self) -> Any:
        from slmops.generation import GenerationSpec
        from slmops.onnxmeta import read_metadata

        def spec() -> Any:
            found = GenerationSpec.from_metadata(read_metadata(self.generation_file()))
            assert found is not None, "the generation file carries no generation spec"
            return found

        return self._stage("spec", spec)


@pytest.fixture(scope="session")
def tiny_archs() -> ModuleType:
    """The writers and quantizers (tests cannot import this folder's modules)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return TINY


@pytest.fixture(scope="session")
def arch_cases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ArchCase]:
    """The one :class:`ArchCase` of an architecture, by name: what ``arch_case`` gives too, for
    a test about one architecture (its stages are built once either way)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cases: dict[str, ArchCase] = {}

    def case(name: str) -> ArchCase:
        if name not in cases:
            cases[name] = ArchCase(name, tmp_path_factory.mktemp(f"arch-{name}"))
        return cases[name]

    return case


@pytest.fixture(scope="session", params=sorted(TINY.ARCHS))
def arch_case(request: pytest.FixtureRequest, arch_cases: Callable[[str], ArchCase]) -> ArchCase:
    return arch_cases(request.param)
