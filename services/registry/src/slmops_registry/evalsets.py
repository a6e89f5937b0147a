"""Evaluation sets: checked before a version may reference one (the SDK's parser, streamed).

JSONL, one example per line: a non-empty ``text``, optional ``label`` (string or integer) and
``topic``. The validator parses the same way, so a set the registry accepts is one it can use.
"""

from __future__ import annotations

from pathlib import Path

from slmops.evaldata import MAX_EVAL_RECORDS, EvalSetError, iter_eval_jsonl

__all__ = ["EvalSetError", "check_eval_set"]


def check_eval_set(path: Path, *, max_examples: int = MAX_EVAL_RECORDS) -> int:
    """Return the number of examples in the JSONL file at ``path``, or raise EvalSetError."""
    with path.open("rb") as lines:
        return sum(1 for _ in iter_eval_jsonl(lines, max_records=max_examples))
