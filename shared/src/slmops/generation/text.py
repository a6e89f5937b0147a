"""Tokens ↔ text for streaming: the tokenizer, an incremental detokenizer, stop strings.

Streaming text token by token is not ``decode([token])`` per token: byte-level BPE splits one
character over several tokens (a partial UTF-8 sequence decodes to U+FFFD), and SentencePiece
tokenizers drop a word's leading space when a token is decoded alone. The detokenizer decodes a
small window that starts one step back (the technique of Hugging Face's text-generation-
inference) and only emits text once it no longer ends in a replacement character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class Codec:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library; no transformers)."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer: Any = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        found = self._tokenizer.token_to_id(token)
        return None if found is None else int(found)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self)


@dataclass
class Detokenizer:
    """Feed generated token ids one at a time; get back the text they complete."""

    codec: Codec
    ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # window start: one token before the unread ones
    _read: int = 0  # tokens whose text has been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.codec.decode(self.ids[self._prefix : self._read])
        now = self.codec.decode(self.ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character (or a special token): wait for more
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """Whatever text is still held back (the end of the generation)."""
        before = self.codec.decode(self.ids[self._prefix : self._read])
        now = self.codec.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


@dataclass
class StopStrings:
    """Holds back text that may be the start of a stop string; cuts at the first one found.

    ``push`` returns the text safe to emit; ``stopped`` turns True once a stop string appeared
    (the text from it on is never emitted, as OpenAI's ``stop`` behaves).
    """

    stops: Sequence[str]
    _pending: str = ""
    stopped: bool = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        cut = min(
            (i for i in (self._pending.find(s) for s in self.stops if s) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = max((_overlap(self._pending, s) for s in self.stops if s), default=0)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0
