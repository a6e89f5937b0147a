"""Passes are found by walking the package, not from a hand-kept list: a module that registers
a pass is available to recipes without being named anywhere else."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from slmops_optimizer import passes
from slmops_optimizer.passes import Pass, create_pass, load_pass_modules, pass_names

PASSES_DIR = Path(passes.__file__).parent
PLUGIN = """
from slmops_optimizer.passes import register
from slmops_optimizer.passes.base import OnnxModel, Pass, PassConfig, PassContext


class ShoutConfig(PassConfig):
    loudness: int = 1


@register
class Shout(Pass[ShoutConfig]):
    name = "test_discovery_shout"
    config_class = ShoutConfig

    def run(self, model: OnnxModel, ctx: PassContext) -> OnnxModel:
        return model
"""


@pytest.fixture
def extra_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package no code names, holding one pass module (removed from sys.modules after)."""
    package = tmp_path / "discovery_extra_passes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "shout.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "discovery_extra_passes"
    for name in [n for n in sys.modules if n.startswith("discovery_extra_passes")]:
        del sys.modules[name]


def test_every_pass_module_in_the_package_is_registered_without_a_list() -> None:
    # The modules that decorate a class with @register, found by reading the folder.
    registering = {p.stem for p in PASSES_DIR.glob("*.py") if "\n@register\n" in p.read_text()}

    modules = load_pass_modules()

    assert registering >= {"convert", "int8_dynamic", "weight_only"}
    for stem in registering:
        module = sys.modules[f"{passes.__name__}.{stem}"]
        assert module.__name__ in modules
        classes = [c for c in vars(module).values() if isinstance(c, type)
                   and issubclass(c, Pass) and c.__module__ == module.__name__]  # fmt: skip
        assert classes
        assert {c.name for c in classes} <= set(pass_names())


def test_a_pass_module_nobody_lists_is_found(extra_package: str) -> None:
    assert "test_discovery_shout" not in pass_names()

    found = load_pass_modules(extra_package)

    assert found == [f"{extra_package}.shout"]
    assert "test_discovery_shout" in pass_names()
    assert create_pass("test_discovery_shout", {"loudness": 3}).name == "test_discovery_shout"
