"""`slmops up --nats-cluster 3`: three NATS nodes in the stack, streams R3, services told every
node; `slmops status` lists the nodes, `slmops down` stops them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nats
import nats.errors
import psutil
import pytest

from slmops.bus.credentials import NatsCredentials
from slmops.bus.topology import GIB, Topology
from slmops.settings import PlatformSettings
from slmops.stack import StackError, StackSettings, plan_stack
from slmops.stack import components as components_module
from slmops.stack.components import jetstream_replicas, stack_platform
from slmops.stack.identities import enroll_gateway
from slmops.stack.preflight import JETSTREAM_DISK_SHARE, check_disk
from slmops.stack.state import read_state, state_path
from slmops.stack.status import stack_urls
from slmops.testing.localstack import stack_env_vars
from slmops.testing.polling import until_answered

CLI = [sys.executable, "-m", "slmops.stack"]


def test_plan_of_a_cluster_gives_three_nodes_their_ports_and_services_every_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(components_module, "discover_services", lambda: ["registry"])
    monkeypatch.setattr(components_module, "_check_runnable", lambda name: None)
    platform = PlatformSettings(var_dir=tmp_path)
    stack = StackSettings(nats_port=4000, nats_monitor_port=5000, nats_cluster_port=6000,
                          nats_cluster_size=3)  # fmt: skip

    specs = plan_stack(stack, platform)

    assert [s.name for s in specs] == ["nats-1", "nats-2", "nats-3", "s3", "registry"]
    assert [[c.port for c in s.ports] for s in specs[:3]] == [
        [4000, 6000, 5000], [4001, 6001, 5001], [4002, 6002, 5002]
    ]  # fmt: skip
    all_nodes = "nats://127.0.0.1:4000,nats://127.0.0.1:4001,nats://127.0.0.1:4002"
    assert specs[-1].env["SLMOPS_NATS_URL"] == all_nodes
    assert specs[-1].env["SLMOPS_JETSTREAM_REPLICAS"] == "3"
    config = next(iter(specs[1].files.values()))
    assert 'server_name: "nats-2"' in config
    assert "127.0.0.1:6000" in config
    assert "127.0.0.1:6002" in config
    assert "include" in config  # the platform's users, as on one node
    assert all(s.ready_url.endswith("/healthz") for s in specs[:3])
    # one node: as before, replicas 1
    single = plan_stack(StackSettings(nats_port=4000), platform)
    assert single[0].name == "nats"
    assert single[-1].env["SLMOPS_NATS_URL"] == "nats://127.0.0.1:4000"
    assert jetstream_replicas(StackSettings(), platform) == 1
    # replicas the cluster cannot hold are refused before anything starts
    with pytest.raises(StackError, match="needs at least 3 NATS servers"):
        stack_platform(StackSettings(), PlatformSettings(var_dir=tmp_path, jetstream_replicas=3))


async def _connect_to_each(urls: list[str], credentials: NatsCredentials) -> None:
    for url in urls:

        async def admitted(url: str = url) -> bool:
            try:
                client = await nats.connect(url, nkeys_seed_str=credentials.nkey_seed,
                                            allow_reconnect=False, connect_timeout=1)  # fmt: skip
            except (nats.errors.Error, OSError):
                return False
            await client.close()
            return True

        await until_answered(admitted, f"the gateway let in by {url}", timeout_s=10)


@pytest.mark.integration
@pytest.mark.slow
def test_up_with_a_nats_cluster_starts_three_nodes_and_down_stops_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env |= stack_env_vars(tmp_path / "var")  # three free ports in a row for each NATS port
    env |= {
        "SLMOPS_STACK_SERVICES": "",  # NATS and S3: the services' own tests run them
        "SLMOPS_STACK_STOP_TIMEOUT_S": "10",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    try:
        up = cli("up", "--detach", "--nats-cluster", "3")
        assert up.returncode == 0, up.stderr
        status = cli("status", "--json")
        document = json.loads(status.stdout)
        assert status.returncode == 0, document
        assert list(document["components"]) == ["nats-1", "nats-2", "nats-3", "s3"]
        storage = {use["name"]: use["replicas"] for use in document["storage"]}
        assert storage["SLMOPS_PIPELINE"] == 3
        assert storage["KV_slmops-desired-state"] == 3
        assert set(storage.values()) == {3}
        assert stack_urls(document)["nats"].count("nats://127.0.0.1:") == 3
        # an enrolled gateway is let in by every node (each re-reads the users)
        enrolled = enroll_gateway(tmp_path / "var", "gw-cluster-1")
        nodes = [c["urls"]["nats"] for c in document["components"].values() if "nats" in c["urls"]]
        asyncio.run(_connect_to_each(nodes, NatsCredentials.from_seed_file(enrolled.nkey_file)))
        state = read_state(state_path(tmp_path / "var"))
        assert state is not None
        pids = [record.pid for record in state.components]
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []


def test_up_with_a_cluster_counts_every_nodes_copy_of_the_caps_against_the_disk(
    tmp_path: Path,
) -> None:
    """All three nodes' stores share this disk, each holding a copy: caps that fit once (the
    fleet stream's at half of what JetStream may use) do not fit three times."""
    usable_gib = shutil.disk_usage(tmp_path).free * JETSTREAM_DISK_SHARE / GIB
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env |= stack_env_vars(tmp_path / "var")
    small = {
        name: 0.01
        for name in (
            "SLMOPS_PIPELINE",
            "SLMOPS_ROLLOUT",
            "SLMOPS_DLQ",
            "KV_slmops-desired-state",
            "KV_slmops-gateways",
        )
    }
    caps = {**small, "SLMOPS_FLEET": usable_gib / 2}
    check_disk(tmp_path, Topology().sized(1, caps))  # one copy fits
    env["SLMOPS_STREAM_MAX_GB"] = json.dumps(caps)

    up = subprocess.run([*CLI, "up", "--detach", "--nats-cluster", "3"], env=env,
                        capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    assert up.returncode != 0
    assert "JetStream reserves" in up.stderr
    assert "3 replicas each" in up.stderr
    assert not (tmp_path / "var" / "logs" / "nats-1.log").exists()
