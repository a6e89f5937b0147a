"""The local stack (`slmops up`) as processes on free ports with its own state folder, for
tests and benchmarks that need the real thing: nats-server, the S3 server, every service."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slmops.stack.components import discover_services
from slmops.stack.status import stack_urls
from slmops.testing.ports import free_port_range, free_ports

STACK = (sys.executable, "-m", "slmops.stack")


def stack_env_vars(var_dir: Path, ready_timeout_s: float = 180.0) -> dict[str, str]:
    """``SLMOPS_*`` variables giving a stack its own folder and free ports (three in a row
    for each NATS port, so ``SLMOPS_STACK_NATS_CLUSTER_SIZE=3`` runs a cluster too)."""
    (s3_port,) = free_ports(1)
    return {
        "SLMOPS_VAR_DIR": str(var_dir),
        "SLMOPS_STACK_NATS_PORT": str(free_port_range(3)),
        "SLMOPS_STACK_NATS_MONITOR_PORT": str(free_port_range(3)),
        "SLMOPS_STACK_NATS_CLUSTER_PORT": str(free_port_range(3)),
        "SLMOPS_STACK_S3_PORT": str(s3_port),
        # one port per installed service from the base port
        "SLMOPS_STACK_SERVICE_BASE_PORT": str(free_port_range(max(1, len(discover_services())))),
        "SLMOPS_STACK_READY_TIMEOUT_S": str(ready_timeout_s),
    }


@dataclass(frozen=True)
class RunningStack:
    env: dict[str, str]  # the environment every CLI call against this stack needs
    urls: dict[str, str]  # service name -> base URL; "nats" -> NATS URL

    @property
    def var_dir(self) -> Path:
        return Path(self.env["SLMOPS_VAR_DIR"])


@contextlib.contextmanager
def local_stack(var_dir: Path, **extra_env: str) -> Iterator[RunningStack]:
    """`slmops up --detach` with its own folder and ports; `slmops down` on the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env.update({**stack_env_vars(var_dir), "HF_HUB_OFFLINE": "1", **extra_env})
    try:
        up = subprocess.run([*STACK, "up", "--detach"], env=env, capture_output=True,
                            text=True, timeout=600, check=False)  # fmt: skip
        if up.returncode != 0:
            raise RuntimeError(f"the local stack did not start:\n{up.stdout}\n{up.stderr}")
        status = subprocess.run([*STACK, "status", "--json"], env=env, capture_output=True,
                                text=True, timeout=60, check=True)  # fmt: skip
        yield RunningStack(env, stack_urls(json.loads(status.stdout)))
    finally:
        subprocess.run([*STACK, "down"], env=env, capture_output=True, timeout=180, check=False)
