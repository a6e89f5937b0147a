"""Device-class profiles: the shipped ones load; bad ones fail with file, field and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmops.profiles import ProfileError, load_profile, load_profiles

SHIPPED = Path(__file__).parents[2] / "deploy" / "profiles"


def test_shipped_profiles_cover_the_four_kinds_of_device() -> None:
    profiles = load_profiles(SHIPPED)

    assert set(profiles) >= {"x86-avx512-vnni", "arm64-pi5", "jetson-orin-gpu", "npu-qdq-int8"}
    assert profiles["x86-avx512-vnni"].latency_measurable_on_host is True
    assert profiles["npu-qdq-int8"].requires_static_qdq is True
    assert {p.name for r in profiles["npu-qdq-int8"].recipes for p in r.passes} == {
        "convert", "int8_static_qdq",
    }  # fmt: skip
    assert all(
        not p.latency_measurable_on_host for n, p in profiles.items() if n != "x86-avx512-vnni"
    )


def shipped(name: str) -> dict[str, object]:
    loaded = yaml.safe_load((SHIPPED / f"{name}.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def write(tmp_path: Path, name: str, content: dict[str, object] | str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"opset_min": 21, "opset_max": 14}, "opset_min 21 > opset_max 14"),
        ({"ram_mb": "lots"}, "ram_mb: Input should be a valid integer"),
        ({"precisions": ["int3"]}, "precisions.0: Input should be"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
        ({"recipes": []}, "recipes: List should have at least 1 item"),
        ({"storage_mb": 100}, "budgets.max_size_mb 512.0 exceeds storage_mb 100"),
        ({"quality": {"min_cosine": 2}}, "quality.min_cosine: Input should be less than or equal"),
    ],
    ids=["opset", "type", "enum", "unknown-field", "no-recipes", "budget-vs-storage", "range"],
)
def test_invalid_profile_names_the_file_the_field_and_the_reason(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    path = write(tmp_path, "x86-avx512-vnni", {**shipped("x86-avx512-vnni"), **change})

    with pytest.raises(ProfileError) as raised:
        load_profile(path)

    assert str(path) in str(raised.value)
    assert message in str(raised.value)


def test_duplicate_recipe_names_are_refused(tmp_path: Path) -> None:
    profile = shipped("arm64-pi5")
    recipes = profile["recipes"]
    assert isinstance(recipes, list)
    path = write(tmp_path, "arm64-pi5", {**profile, "recipes": [recipes[0], recipes[0]]})

    with pytest.raises(ProfileError, match="recipe names repeat: gguf-exact-blocks"):
        load_profile(path)


def test_name_must_match_the_file_and_yaml_must_parse(tmp_path: Path) -> None:
    renamed = write(tmp_path, "other-name", shipped("arm64-pi5"))
    broken = write(tmp_path, "broken", "name: [unclosed")

    with pytest.raises(ProfileError, match="must match the file name"):
        load_profile(renamed)
    with pytest.raises(ProfileError, match="cannot read YAML"):
        load_profile(broken)


def test_all_problems_of_a_directory_are_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, "arm64-pi5", {**shipped("arm64-pi5"), "ram_mb": -1})
    write(tmp_path, "npu-qdq-int8", {**shipped("npu-qdq-int8"), "precisions": ["fp16"]})

    with pytest.raises(ProfileError) as raised:
        load_profiles(tmp_path)

    assert "arm64-pi5.yaml: ram_mb" in str(raised.value)
    assert "requires_static_qdq needs int8" in str(raised.value)
    with pytest.raises(ProfileError, match="no device profiles"):
        load_profiles(tmp_path / "empty")


def test_candidates_are_filtered_by_source_format_and_task() -> None:
    profiles = load_profiles(SHIPPED)

    x86 = profiles["x86-avx512-vnni"]
    gguf_decoder = [r.name for r in x86.candidates("gguf", "text-generation")]
    hf_encoder = [r.name for r in x86.candidates("hf-safetensors", "feature-extraction")]

    # a GGUF keeps its own blocks (no INT4 requantization); decoders skip dynamic INT8
    assert gguf_decoder == ["gguf-exact-blocks"]
    assert hf_encoder == ["int8-dynamic-per-channel", "int8-weight-only", "int4-weight-only"]
    assert profiles["npu-qdq-int8"].candidates("gguf", "text-generation") == []
    assert x86.candidates("gguf", "text-generation")[0].recipe().model_dump() == {
        "name": "gguf-exact-blocks",
        "passes": [{"name": "convert", "config": {}}, {"name": "gguf_blocks", "config": {}}],
    }
