"""A free local port for a server a test starts as a separate process (it must know the port
before the process binds it; in-process servers bind port 0 instead)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
