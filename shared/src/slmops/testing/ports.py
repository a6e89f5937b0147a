"""A free local port for a server a test starts as a separate process (it must know the port
before the process binds it; in-process servers bind port 0 instead)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port_range(count: int) -> int:
    """A base port with ``count`` consecutive free ports, below the ephemeral range (the
    local stack gives its i-th service base + i)."""
    for _ in range(200):
        base = random.randint(20_000, 32_000)  # noqa: S311 - a port, not a secret
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")
