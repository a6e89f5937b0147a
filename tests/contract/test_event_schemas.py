"""The event contracts may grow but not break: exported schemas vs committed snapshots.

After a compatible change (a new optional field, a new event type) run `make schemas` and
commit the snapshots. An incompatible change needs a new `.v2` event type instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.events import EVENT_TYPES
from slmops.events.schemas import breaking_changes, event_schema

SNAPSHOTS = Path(__file__).with_name("snapshots")


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_schema_is_compatible_with_its_snapshot(event_type: str) -> None:
    snapshot = SNAPSHOTS / f"{event_type}.json"
    assert snapshot.exists(), f"new event type {event_type}: run `make schemas` and commit"

    problems = breaking_changes(json.loads(snapshot.read_text()), event_schema(event_type))

    assert problems == [], f"{event_type} changed incompatibly: {problems}"


def test_no_snapshot_lost_its_event_type() -> None:
    snapshotted = {p.name.removesuffix(".json") for p in SNAPSHOTS.glob("*.json")}

    assert snapshotted - set(EVENT_TYPES) == set(), "event types may grow, not shrink"


def test_cli_exports_one_schema_per_type(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "slmops.cli.main", "schemas", "export", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip

    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == sorted(f"{t}.json" for t in EVENT_TYPES)
    assert f"wrote {len(EVENT_TYPES)} schemas" in result.stdout
    schema = json.loads((tmp_path / "slmops.model.published.v1.json").read_text())
    assert schema["properties"]["type"]["type"] == "string"
    assert "ModelPublished" in schema["$defs"]


def _published_schema() -> dict[str, object]:
    return event_schema("slmops.model.published.v1")


def test_checker_flags_removed_field() -> None:
    old, new = _published_schema(), _published_schema()
    del new["$defs"]["ModelPublished"]["properties"]["task"]  # type: ignore[index]

    assert breaking_changes(old, new) == ["data.task: property removed"]


def test_checker_flags_retyped_field() -> None:
    old, new = _published_schema(), _published_schema()
    new["$defs"]["ArtifactRef"]["properties"]["size_bytes"] = {"type": "string"}  # type: ignore[index]

    assert breaking_changes(old, new) == [  # ArtifactRef is used in two places
        "data.artifact.size_bytes: type changed from {'integer'} to {'string'}",
        "data.eval_set.size_bytes: type changed from {'integer'} to {'string'}",
    ]


def test_checker_flags_new_required_field_and_removed_enum_value() -> None:
    old, new = _published_schema(), _published_schema()
    published = new["$defs"]["ModelPublished"]  # type: ignore[index]
    published["properties"]["owner"] = {"type": "string"}
    published["required"].append("owner")
    published["properties"]["format"]["enum"].remove("gguf")

    assert breaking_changes(old, new) == [
        "data.format: enum values removed: ['gguf']",
        "data.owner: new required property",
    ]


def test_checker_accepts_a_new_optional_field() -> None:
    old, new = _published_schema(), _published_schema()
    new["$defs"]["ModelPublished"]["properties"]["owner"] = {"type": "string"}  # type: ignore[index]

    assert breaking_changes(old, new) == []
