"""Evaluation sets: JSONL, one example per line, checked before a version may reference one.

Each line is a JSON object with a non-empty ``text`` string; ``label`` (string or integer) and
``id`` are optional and other keys are kept for later use. Checked line by line, streaming.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_EXAMPLES = 100_000


class EvalSetError(ValueError):
    """The evaluation set is not valid JSONL of examples; the message names the line."""


def check_eval_set(path: Path, *, max_examples: int = MAX_EXAMPLES) -> int:
    """Return the number of examples in the JSONL file at ``path``, or raise EvalSetError."""
    count = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                example = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise EvalSetError(f"line {number} is not JSON: {exc}") from exc
            if not isinstance(example, dict):
                raise EvalSetError(f"line {number} is not a JSON object")
            text = example.get("text")
            if not isinstance(text, str) or not text.strip():
                raise EvalSetError(f"line {number} has no non-empty 'text' string")
            label = example.get("label")
            if label is not None and not isinstance(label, str | int):
                raise EvalSetError(f"line {number}: 'label' must be a string or an integer")
            count += 1
            if count > max_examples:
                raise EvalSetError(f"more than {max_examples} examples")
    if count == 0:
        raise EvalSetError("no examples (an empty file)")
    return count
