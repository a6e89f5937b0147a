"""JSON Schema per event type, and the compatibility rule the contract test enforces.

A change to a ``v1`` payload is compatible when every old consumer can still read new events
and every new consumer can read old ones: no property removed or retyped, no new required
property, no enum value removed. Anything else needs a new ``.v2`` type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmops.events.envelope import event_model
from slmops.events.registry import EVENT_TYPES

JsonSchema = dict[str, Any]


def event_schema(event_type: str) -> JsonSchema:
    """The JSON Schema of a whole CloudEvent of ``event_type`` (envelope + typed data)."""
    schema = event_model(EVENT_TYPES[event_type]).model_json_schema(mode="serialization")
    schema["title"] = event_type
    schema["$id"] = f"https://slmops.dev/schemas/{event_type}.json"
    return schema


def export_schemas(directory: Path) -> list[Path]:
    """Write ``<type>.json`` for every event type; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type in sorted(EVENT_TYPES):
        path = directory / f"{event_type}.json"
        path.write_text(json.dumps(event_schema(event_type), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def breaking_changes(old: JsonSchema, new: JsonSchema) -> list[str]:
    """Human-readable reasons why ``new`` cannot replace ``old`` under the same type name."""
    problems: list[str] = []
    _compare(old, new, old.get("$defs", {}), new.get("$defs", {}), "", problems)
    return problems


def _resolve(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _resolve(defs[ref.removeprefix("#/$defs/")], defs)
    return node


def _types(node: JsonSchema) -> set[str]:
    """The JSON types a (resolved) node admits; anyOf branches are merged."""
    if "anyOf" in node:
        return set().union(*(_types(branch) for branch in node["anyOf"]))
    if "type" in node:
        kind = node["type"]
        return set(kind) if isinstance(kind, list) else {kind}
    if "const" in node or "enum" in node:
        return {"enum"}
    return {"$ref" if "$ref" in node else "any"}


def _compare(
    old: JsonSchema,
    new: JsonSchema,
    old_defs: dict[str, JsonSchema],
    new_defs: dict[str, JsonSchema],
    path: str,
    problems: list[str],
) -> None:
    old, new = _resolve(old, old_defs), _resolve(new, new_defs)
    where = path or "<root>"
    if _types(old) - _types(new) - {"$ref"}:
        problems.append(f"{where}: type changed from {_types(old)} to {_types(new)}")
        return
    old_enum = set(map(str, old.get("enum", [old["const"]] if "const" in old else [])))
    new_enum = set(map(str, new.get("enum", [new["const"]] if "const" in new else [])))
    if old_enum and new_enum and old_enum - new_enum:
        problems.append(f"{where}: enum values removed: {sorted(old_enum - new_enum)}")
    old_props: dict[str, JsonSchema] = old.get("properties", {})
    new_props: dict[str, JsonSchema] = new.get("properties", {})
    for name, old_prop in old_props.items():
        child = f"{path}.{name}" if path else name
        if name not in new_props:
            problems.append(f"{child}: property removed")
            continue
        _compare(old_prop, new_props[name], old_defs, new_defs, child, problems)
    for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
        problems.append(f"{path + '.' if path else ''}{name}: new required property")
    for key in ("items", "additionalProperties"):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            _compare(old[key], new[key], old_defs, new_defs, f"{path}[{key}]", problems)
    if "anyOf" in old and "anyOf" in new:
        # Optional objects are anyOf [ {$ref}, {null} ]: compare the object branches.
        old_objs = [b for b in old["anyOf"] if "$ref" in b]
        new_objs = [b for b in new["anyOf"] if "$ref" in b]
        if len(old_objs) == 1 and len(new_objs) == 1:
            _compare(old_objs[0], new_objs[0], old_defs, new_defs, path, problems)
