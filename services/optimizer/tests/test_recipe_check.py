"""The optimizer refuses to start when a device profile's recipe names a pass the registry does
not have (or configures one wrongly): the error names the profile, the recipe and the pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmops.profiles import ProfileError, load_profiles
from slmops_optimizer.app import create_app
from slmops_optimizer.recipe_check import recipe_problems
from slmops_optimizer.settings import OptimizerSettings

SHIPPED = Path(__file__).parents[3] / "deploy" / "profiles"
CLASS = "x86-avx512-vnni"
RECIPE = "int8-dynamic-per-channel"


def profiles_with(tmp_path: Path, last_pass: dict[str, object]) -> Path:
    """The shipped profiles, with the last pass of one recipe of one class replaced."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    for path in SHIPPED.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        if raw["name"] == CLASS:
            (recipe,) = [r for r in raw["recipes"] if r["name"] == RECIPE]
            recipe["passes"][-1] = last_pass
        (folder / path.name).write_text(yaml.safe_dump(raw))
    return folder


@pytest.fixture
def local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMOPS_ENV", "local")
    monkeypatch.setenv("SLMOPS_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)


@pytest.mark.usefixtures("local_env")
def test_a_pass_name_with_a_typo_stops_the_optimizer_at_start_up(tmp_path: Path) -> None:
    # setup: int8_dynamic misspelt in one recipe
    folder = profiles_with(tmp_path, {"name": "int8_dynamik", "config": {"per_channel": True}})

    # execute
    with pytest.raises(ProfileError) as raised:
        create_app(OptimizerSettings(profiles_dir=folder, work_dir=tmp_path / "work"))

    # assert: one problem, saying where and what
    message = str(raised.value)
    assert f"profile {CLASS}, recipe {RECIPE}, pass 3 ('int8_dynamik')" in message
    assert "unknown pass 'int8_dynamik'" in message
    assert "int8_dynamic" in message  # the known passes are listed: the fix is visible
    assert len(message.splitlines()) == 2  # a heading, then one line per problem


def test_a_config_a_pass_refuses_is_named_too(tmp_path: Path) -> None:
    folder = profiles_with(tmp_path, {"name": "int8_dynamic", "config": {"per_chanel": True}})

    problems = recipe_problems(load_profiles(folder))

    assert len(problems) == 1
    assert problems[0].startswith(f"profile {CLASS}, recipe {RECIPE}, pass 3 ('int8_dynamic')")
    assert "per_chanel" in problems[0]


@pytest.mark.usefixtures("local_env")
def test_the_shipped_profiles_start_the_optimizer(tmp_path: Path) -> None:
    app = create_app(OptimizerSettings(profiles_dir=SHIPPED, work_dir=tmp_path / "work"))

    assert set(app.state.optimizer.profiles) == set(load_profiles(SHIPPED))
