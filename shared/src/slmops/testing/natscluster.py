"""A real 3-node NATS JetStream cluster (three ``nats-server`` processes, routes on loopback)
for tests and benchmarks: kill a node, restart it with its ports and store, watch it catch up.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from slmops.secretfiles import write_private
from slmops.stack.binaries import nats_server_binary
from slmops.stack.natscluster import (
    NatsNode,
    client_urls,
    cluster_nodes,
    new_route_password,
    render_node_config,
)
from slmops.testing.ports import free_port_range


class NatsCluster:
    """``size`` nodes under ``root``; ``auth_config`` (a ``BusUsers.config_file``) makes every
    node require the platform's users, as the local stack's NATS does."""

    def __init__(
        self, root: Path, *, size: int = 3, auth_config: Path | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        self.root = root
        self.auth_config = auth_config
        self.start_timeout_s = start_timeout_s
        # three runs of consecutive free ports: clients, routes, monitors
        clients, routes, monitors = (free_port_range(size) for _ in range(3))
        self.nodes: list[NatsNode] = cluster_nodes(size, clients, routes, monitors, root)
        self.route_password = new_route_password()
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def urls(self) -> list[str]:
        """Every node's client URL (nats-py's ``servers=[...]``)."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The same, comma separated (``SLMOPS_NATS_URL``, ``Bus.connect``)."""
        return client_urls(self.nodes)

    def config_path(self, index: int) -> Path:
        return self.root / f"{self.nodes[index].name}.conf"

    def _spawn(self, index: int) -> None:
        node, path = self.nodes[index], self.config_path(index)
        node.store_dir.mkdir(parents=True, exist_ok=True)
        write_private(path, render_node_config(node, self.nodes, self.route_password, path,
                                               self.auth_config))  # fmt: skip
        log = (self.root / f"{node.name}.log").open("ab")
        with log:
            self.procs[index] = subprocess.Popen(
                [str(nats_server_binary()), "-c", str(path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def start(self) -> None:
        """Start every node, then wait until they agree on a JetStream meta leader and each
        is healthy."""
        for index in range(len(self.nodes)):
            self._spawn(index)
        try:
            for index in range(len(self.nodes)):
                self.wait_healthy(index)
            deadline = time.monotonic() + self.start_timeout_s
            while not self.formed():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no meta leader with every peer current under {self.root}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def jsz(self, index: int, **params: str) -> dict[str, Any] | None:
        """Node ``index``'s ``/jsz`` (None if it does not answer)."""
        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = httpx.get(f"{self.nodes[index].monitor_url}/jsz", params=params,
                               timeout=1.0, trust_env=False)  # fmt: skip
            document: dict[str, Any] = answer.json()
            return document
        return None

    def stream_messages(self, index: int) -> dict[str, int]:
        """Messages per stream in node ``index``'s own copy (empty if it does not answer)."""
        jsz = self.jsz(index, streams="true") or {}
        return {
            stream["name"]: int(stream["state"]["messages"])
            for account in jsz.get("account_details") or []
            for stream in account.get("stream_detail") or []
        }

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's server name, as the first answering node sees it."""
        for index, proc in enumerate(self.procs):
            if proc is None or proc.poll() is not None:
                continue
            jsz = self.jsz(index)
            leader = ((jsz or {}).get("meta_cluster") or {}).get("leader")
            if leader:
                return str(leader)
        return None

    def formed(self) -> bool:
        """The meta leader sees every other node as a current peer."""
        for index, node in enumerate(self.nodes):
            meta = (self.jsz(index) or {}).get("meta_cluster") or {}
            if meta.get("leader") == node.name:
                peers = meta.get("replicas") or []
                return len(peers) == len(self.nodes) - 1 and all(
                    peer.get("current") and not peer.get("offline") for peer in peers
                )
        return False

    def healthy(self, index: int) -> bool:
        """``/healthz`` answers 200: JetStream on, a meta leader known, this node's streams
        and consumers current."""
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(f"{self.nodes[index].monitor_url}/healthz", timeout=1.0,
                               trust_env=False)  # fmt: skip
            return answer.status_code == 200
        return False

    def wait_healthy(self, index: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        node = self.nodes[index]
        while not (self.healthy(index) and self.meta_leader()):
            proc = self.procs[index]
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{node.name} is not running (log {self.root}/{node.name}.log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} not healthy within {self.start_timeout_s:g} s")
            time.sleep(0.05)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (no goodbye to its peers or clients)."""
        proc = self.procs[index]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.procs[index] = None

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start node ``index`` again on its ports with its store (after :meth:`kill`)."""
        self.kill(index)
        self._spawn(index)
        if wait:
            self.wait_healthy(index)

    def stop(self) -> None:
        for index, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.procs[index] = None


@contextlib.contextmanager
def nats_cluster(root: Path, **options: Any) -> Iterator[NatsCluster]:
    """A started :class:`NatsCluster`, stopped on the way out."""
    cluster = NatsCluster(root, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
