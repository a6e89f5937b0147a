"""Evaluation sets: the platform's built-in English set and a parser for JSONL sets.

The optimizer uses an evaluation set for calibration and a quick quality score, and the
validator uses one for parity checks against the parent model. A model version may bring its
own set; when it has none, both fall back to the built-in set shipped in ``default.jsonl``
(named :data:`DEFAULT_EVAL_SET_NAME` in reports). Its 96 texts were written for this project
and are not taken from any other source: everyday and technical topics, a third short (10-25
words), a third medium (40-80) and a third long (120-220, long enough to cut decoder windows of
64-128 tokens), interleaved so that any prefix of the set has a mix of lengths.

An evaluation set is UTF-8 JSONL: one JSON object per line with a non-empty ``"text"`` and
optionally a ``"label"`` (string or integer) and a ``"topic"``; other fields are ignored and
blank lines are skipped. A malformed set fails with :class:`EvalSetError`, naming the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import cache
from importlib import resources

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

__all__ = [
    "DEFAULT_EVAL_SET_NAME",
    "MAX_EVAL_RECORDS",
    "EvalRecord",
    "EvalSetError",
    "default_records",
    "default_texts",
    "iter_eval_jsonl",
    "parse_eval_jsonl",
]

DEFAULT_EVAL_SET_NAME = "slmops-builtin-en-v1"
_DEFAULT_FILE = "default.jsonl"
_EXPECTED = {
    "text": "a string",
    "label": "a string, an integer or null",
    "topic": "a string or null",
}


class EvalSetError(ValueError):
    """An evaluation set that cannot be used; the message names the line and the problem."""


class EvalRecord(BaseModel):
    """One example of an evaluation set."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    text: StrictStr = Field(description="Input text; not blank.")
    label: StrictStr | StrictInt | None = Field(
        None, description="Expected class or answer, for labelled sets."
    )
    topic: StrictStr | None = Field(None, description="What the text is about, for reports.")

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _parse_line(line: str, lineno: int) -> EvalRecord:
    try:
        obj: object = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalSetError(
            f"line {lineno}: not valid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # a huge integer, or nesting too deep
        raise EvalSetError(f"line {lineno}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EvalSetError(f"line {lineno}: expected a JSON object, got {_json_kind(obj)}")
    if "text" not in obj:
        raise EvalSetError(f'line {lineno}: the record has no "text" field')
    text = obj["text"]
    if isinstance(text, str) and not text.strip():
        raise EvalSetError(f'line {lineno}: "text" is empty')
    try:
        return EvalRecord.model_validate(obj)
    except ValidationError as exc:
        fields = dict.fromkeys(str(err["loc"][0]) for err in exc.errors() if err["loc"])
        problems = "; ".join(
            f'"{name}" must be {_EXPECTED[name]}, got {_json_kind(obj.get(name))}'
            for name in fields
        )
        raise EvalSetError(f"line {lineno}: {problems or exc}") from None


#: The most records an evaluation set may have (the registry refuses larger ones at publish).
MAX_EVAL_RECORDS = 100_000


def iter_eval_jsonl(
    lines: Iterable[bytes], *, max_records: int = MAX_EVAL_RECORDS
) -> Iterator[EvalRecord]:
    """Parse JSONL line by line (a file opened in binary mode streams); raise
    :class:`EvalSetError` naming the first bad line."""
    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}")
    count = 0
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise EvalSetError(
                f"line {lineno}: not UTF-8 text (invalid byte at column {exc.start + 1})"
            ) from None
        if not line.strip():
            continue
        if count == max_records:
            raise EvalSetError(
                f"line {lineno}: the evaluation set has more than the limit of "
                f"{max_records} records"
            )
        count += 1
        yield _parse_line(line, lineno)
    if count == 0:
        raise EvalSetError("the evaluation set has no records")


def parse_eval_jsonl(data: bytes, *, max_records: int = MAX_EVAL_RECORDS) -> list[EvalRecord]:
    """Parse a JSONL evaluation set; raise :class:`EvalSetError` naming the first bad line."""
    return list(iter_eval_jsonl(data.split(b"\n"), max_records=max_records))


@cache
def _default_records() -> tuple[EvalRecord, ...]:
    data = resources.files(__name__).joinpath(_DEFAULT_FILE).read_bytes()
    return tuple(parse_eval_jsonl(data))


def default_records() -> list[EvalRecord]:
    """The built-in evaluation set (read once, then cached; the list is a fresh copy)."""
    return list(_default_records())


def default_texts() -> list[str]:
    """The texts of the built-in evaluation set, in file order."""
    return [record.text for record in _default_records()]
