"""A file parsed again only when it changes: key sets, revocation lists and tokens are
re-minted or rotated while processes run, and read on every request."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """``parse(text)`` of ``path``, cached until its mtime or size changes (thread-safe)."""

    def __init__(self, path: Path, parse: Callable[[str], T]) -> None:
        self.path = path
        self._parse = parse
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._value: T | None = None

    def read(self) -> T | None:
        """The parsed content, or None when the file does not exist; parse errors propagate."""
        try:
            stat = self.path.stat()
        except OSError:
            return None
        stamp = (stat.st_mtime, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._value = self._parse(self.path.read_text())
                self._stamp = stamp
            return self._value
