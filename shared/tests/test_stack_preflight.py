"""Before anything starts, `slmops up` checks the disk holds what JetStream will reserve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.bus.topology import GIB, Topology
from slmops.stack.preflight import JETSTREAM_DISK_SHARE, DiskTooSmallError, check_disk
from slmops.testing.localstack import stack_env_vars


def _reserved(topology: Topology) -> int:
    return sum(s.max_bytes for s in topology.streams) + sum(
        b.max_bytes for b in topology.kv_buckets
    )


def test_caps_that_fit_pass_and_caps_that_do_not_say_what_to_do(tmp_path: Path) -> None:
    topology = Topology()
    need = _reserved(topology)
    check_disk(tmp_path, topology, free_bytes=int(need / JETSTREAM_DISK_SHARE) + 1)

    with pytest.raises(DiskTooSmallError) as refused:
        check_disk(
            tmp_path / "not" / "yet", topology, free_bytes=int(need / JETSTREAM_DISK_SHARE) - GIB
        )

    message = str(refused.value)
    assert f"{need / GIB:.1f} GiB" in message
    assert "SLMOPS_STREAM_MAX_GB" in message
    assert str(tmp_path / "not" / "yet") in message


def test_replicas_and_raised_caps_count(tmp_path: Path) -> None:
    raised = Topology().sized(3, {"SLMOPS_FLEET": 32})

    assert _reserved(raised) > 32 * GIB
    with pytest.raises(DiskTooSmallError):
        check_disk(tmp_path, raised, free_bytes=40 * GIB)  # 3 x (32 + ...) > 30 usable


def test_up_refuses_caps_larger_than_the_disk_before_starting_anything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env |= stack_env_vars(tmp_path / "var")
    env["SLMOPS_STREAM_MAX_GB"] = '{"SLMOPS_FLEET": 1000000}'  # a petabyte

    up = subprocess.run([sys.executable, "-m", "slmops.stack", "up", "--detach"], env=env,
                        capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    assert up.returncode != 0
    assert "JetStream reserves" in up.stderr
    assert "SLMOPS_STREAM_MAX_GB" in up.stderr
    assert not (tmp_path / "var" / "logs" / "nats.log").exists()
