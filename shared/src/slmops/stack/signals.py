"""Signal handling of `slmops up` / `slmops down`: stop cleanly, a second signal forces."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Signals:
    """While installed: the first SIGINT/SIGTERM/SIGHUP raises KeyboardInterrupt; once the stack
    is stopping, further ones set :attr:`force` (skip the grace period, SIGKILL now)."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.force = threading.Event()
        self.stopping = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.force.set()
            return
        self.stopping = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Signals]:
        previous = {}
        try:
            for sig in self._SIGNALS:
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
