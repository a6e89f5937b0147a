"""A NATS JetStream cluster on one host: each node's configuration file, routes on loopback.

Used by `slmops up --nats-cluster 3` and by the test helper
:class:`slmops.testing.natscluster.NatsCluster`. Each node is a ``nats-server -c <node.conf>``
with its own client, cluster (route) and monitoring port and its own JetStream store; the
routes between the nodes authenticate with a password shared by the nodes only, so a local
process cannot join the cluster as a "server" and read every subject past the users'
permissions. The password lives in the configuration files (mode 0600), never in an argv
that ``ps`` shows. The users (``auth.conf`` of :mod:`slmops.auth.bususers``) are included
by every node, so each process connects to any node with its own credentials.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

#: What every node of a local cluster calls the cluster (`/jsz` shows it).
CLUSTER_NAME = "slmops"
#: The user the nodes' routes authenticate as (cluster authorization allows one user only).
ROUTE_USER = "route"
LOCAL_HOST = "127.0.0.1"
_HEADER = "# written by slmops (slmops.stack.natscluster); edits are overwritten"


@dataclass(frozen=True)
class NatsNode:
    """One node: its ports on 127.0.0.1 and its JetStream store."""

    index: int  # 0-based position in the cluster
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path

    @property
    def name(self) -> str:
        """``nats-1``, ``nats-2``...: its ``server_name`` and stack component name."""
        return f"nats-{self.index + 1}"

    @property
    def url(self) -> str:
        return f"nats://{LOCAL_HOST}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{LOCAL_HOST}:{self.monitor_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{LOCAL_HOST}:{self.cluster_port}"


def cluster_nodes(
    size: int, client_port: int, cluster_port: int, monitor_port: int, store_root: Path
) -> list[NatsNode]:
    """``size`` nodes on consecutive ports from each base; node i stores under
    ``store_root/nats-<i+1>``."""
    return [
        NatsNode(i, client_port + i, cluster_port + i, monitor_port + i,
                 store_root / f"nats-{i + 1}")
        for i in range(size)
    ]  # fmt: skip


def client_urls(nodes: list[NatsNode]) -> str:
    """Every node's client URL, comma separated: ``SLMOPS_NATS_URL`` of a cluster."""
    return ",".join(node.url for node in nodes)


def new_route_password() -> str:
    return secrets.token_urlsafe(24)


def render_node_config(
    node: NatsNode,
    nodes: list[NatsNode],
    route_password: str,
    config_path: Path,
    auth_config: Path | None = None,
) -> str:
    """``node``'s configuration file (to be written at ``config_path``): JetStream on, routes
    to every other node, ``auth_config`` included (nats-server resolves includes relative to
    the including file, hence the relative path)."""
    routes = [
        f"nats-route://{ROUTE_USER}:{route_password}@{LOCAL_HOST}:{peer.cluster_port}"
        for peer in nodes
        if peer.index != node.index
    ]
    lines = [
        _HEADER,
        f"server_name: {json.dumps(node.name)}",
        f"listen: {json.dumps(f'{LOCAL_HOST}:{node.client_port}')}",
        f"http: {json.dumps(f'{LOCAL_HOST}:{node.monitor_port}')}",
        f"jetstream {{ store_dir: {json.dumps(str(node.store_dir.resolve()))} }}",
        "cluster {",
        f"  name: {json.dumps(CLUSTER_NAME)}",
        f"  listen: {json.dumps(f'{LOCAL_HOST}:{node.cluster_port}')}",
        f"  authorization {{ user: {json.dumps(ROUTE_USER)}, "
        f"password: {json.dumps(route_password)} }}",
        f"  routes: {json.dumps(routes)}",
        "}",
    ]
    if auth_config is not None:
        relative = os.path.relpath(auth_config.resolve(), config_path.resolve().parent)
        lines.append(f"include {json.dumps(relative)}")
    return "\n".join(lines)
