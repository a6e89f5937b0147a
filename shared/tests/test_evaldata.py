"""Evaluation sets: the built-in English set and the JSONL parser's records and errors."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from pydantic import ValidationError

from slmops.evaldata import (
    DEFAULT_EVAL_SET_NAME,
    EvalRecord,
    EvalSetError,
    default_records,
    default_texts,
    parse_eval_jsonl,
)

SHORT = range(10, 26)
MEDIUM = range(40, 81)
LONG = range(120, 221)


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def packaged_lines() -> list[str]:
    data = resources.files("slmops.evaldata").joinpath("default.jsonl").read_bytes()
    return data.decode("ascii").splitlines()


# --- the built-in set ---------------------------------------------------------------------


def test_default_set_has_96_unique_records() -> None:
    records = default_records()

    texts = [r.text for r in records]
    assert len(records) == 96
    assert len(set(texts)) == 96
    assert default_texts() == texts
    assert DEFAULT_EVAL_SET_NAME == "slmops-builtin-en-v1"


def test_default_set_mixes_short_medium_and_long_texts() -> None:
    word_counts = [len(text.split()) for text in default_texts()]

    short = [n for n in word_counts if n in SHORT]
    medium = [n for n in word_counts if n in MEDIUM]
    long = [n for n in word_counts if n in LONG]
    assert (len(short), len(medium), len(long)) == (32, 32, 32)
    assert len(short) + len(medium) + len(long) == len(word_counts)


def test_default_set_interleaves_lengths_so_every_prefix_is_mixed() -> None:
    word_counts = [len(text.split()) for text in default_texts()]

    first_six = word_counts[:6]
    assert sum(n in SHORT for n in first_six) == 2
    assert sum(n in LONG for n in first_six) == 2


def test_default_set_covers_many_topics() -> None:
    records = default_records()

    topics = {r.topic for r in records}
    assert None not in topics
    assert len(topics) >= 20
    assert {"weather", "networking", "factory machine", "customer support"} <= topics


def test_every_line_of_the_packaged_file_is_a_valid_ascii_record() -> None:
    lines = packaged_lines()

    assert len(lines) == 96
    for lineno, line in enumerate(lines, start=1):
        obj = json.loads(line)
        assert set(obj) == {"text", "topic"}, lineno
        assert obj["text"].strip() == obj["text"] != "", lineno
        assert isinstance(obj["topic"], str), lineno
        assert obj["topic"], lineno
        assert parse_eval_jsonl(line.encode()) == [EvalRecord(**obj)], lineno


def test_default_records_returns_a_fresh_list_each_call() -> None:
    first = default_records()
    first.clear()

    second = default_records()

    assert len(second) == 96


def test_default_set_ships_with_the_wheel() -> None:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text())

    patterns = config["tool"]["setuptools"]["package-data"]["slmops"]

    assert any(fnmatch.fnmatch("evaldata/default.jsonl", p) for p in patterns)


# --- parsing ------------------------------------------------------------------------------


def test_parse_keeps_labels_topics_and_order_and_ignores_extra_fields() -> None:
    data = jsonl(
        {"text": "good film", "label": "positive", "topic": "reviews"},
        {"text": "bad film", "label": 0, "source": "ignored"},
        {"text": "no label"},
    )

    records = parse_eval_jsonl(data)

    assert records == [
        EvalRecord(text="good film", label="positive", topic="reviews"),
        EvalRecord(text="bad film", label=0),
        EvalRecord(text="no label"),
    ]
    assert isinstance(records[1].label, int)
    assert not hasattr(records[1], "source")


def test_parse_skips_blank_lines_and_accepts_crlf_and_a_bom() -> None:
    data = b'\xef\xbb\xbf{"text": "one"}\r\n\r\n   \n{"text": "two"}\r\n\n'

    records = parse_eval_jsonl(data)

    assert [r.text for r in records] == ["one", "two"]


def test_parse_keeps_the_text_as_written() -> None:
    data = jsonl({"text": "  indented\nline\u2028sep  "})

    (record,) = parse_eval_jsonl(data)

    assert record.text == "  indented\nline\u2028sep  "


def test_invalid_json_names_its_line_counting_blank_lines() -> None:
    data = b'{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n'

    with pytest.raises(EvalSetError, match=r"^line 3: not valid JSON: .*column") as info:
        parse_eval_jsonl(data)

    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("line", "kind"),
    [("[1, 2]", "an array"), ('"text"', "a string"), ("42", "an integer"), ("null", "null")],
)
def test_a_line_that_is_not_an_object_is_rejected(line: str, kind: str) -> None:
    data = b'{"text": "fine"}\n' + line.encode() + b"\n"

    with pytest.raises(EvalSetError, match=rf"^line 2: expected a JSON object, got {kind}$"):
        parse_eval_jsonl(data)


def test_a_record_without_text_is_rejected() -> None:
    data = jsonl({"text": "fine"}, {"text": "fine"}, {"label": 1})

    with pytest.raises(EvalSetError, match=r'^line 3: the record has no "text" field$'):
        parse_eval_jsonl(data)


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_a_record_with_empty_text_is_rejected(text: str) -> None:
    data = jsonl({"text": text})

    with pytest.raises(EvalSetError, match=r'^line 1: "text" is empty$'):
        parse_eval_jsonl(data)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": 5}, '"text" must be a string, got an integer'),
        ({"text": "a", "label": [1]}, '"label" must be a string, an integer or null, got an array'),
        ({"text": "a", "label": 1.5}, '"label" must be .*, got a decimal number'),
        ({"text": "a", "label": True}, '"label" must be .*, got a boolean'),
        ({"text": "a", "topic": {}}, '"topic" must be a string or null, got an object'),
    ],
)
def test_a_field_of_the_wrong_type_is_rejected_by_name(
    row: dict[str, object], message: str
) -> None:
    data = jsonl({"text": "fine"}, row)

    with pytest.raises(EvalSetError, match=rf"^line 2: {message}$"):
        parse_eval_jsonl(data)


def test_bytes_that_are_not_utf8_are_rejected_with_their_line() -> None:
    data = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'

    with pytest.raises(EvalSetError, match=r"^line 2: not UTF-8"):
        parse_eval_jsonl(data)


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\r\n\t\n"])
def test_an_empty_set_is_rejected(data: bytes) -> None:
    with pytest.raises(EvalSetError, match=r"^the evaluation set has no records$"):
        parse_eval_jsonl(data)


def test_more_records_than_the_limit_is_rejected_naming_the_limit() -> None:
    data = jsonl(*({"text": f"record {i}"} for i in range(4)))

    with pytest.raises(EvalSetError, match=r"^line 4: .*more than the limit of 3 records"):
        parse_eval_jsonl(data, max_records=3)


def test_exactly_the_limit_is_accepted() -> None:
    data = jsonl(*({"text": f"record {i}"} for i in range(3))) + b"\n\n"

    records = parse_eval_jsonl(data, max_records=3)

    assert len(records) == 3


def test_a_non_positive_limit_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="max_records") as info:
        parse_eval_jsonl(jsonl({"text": "a"}), max_records=0)

    assert not isinstance(info.value, EvalSetError)


# --- the record model ---------------------------------------------------------------------


def test_record_is_frozen_and_rejects_blank_text() -> None:
    record = EvalRecord(text="hello")

    with pytest.raises(ValidationError):
        record.text = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="text is empty"):
        EvalRecord(text=" \n ")
