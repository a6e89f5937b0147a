"""Checks before `slmops up` starts anything: one `up` at a time, no live stack, free ports,
disk enough for what JetStream reserves."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from slmops.bus.topology import GIB, Topology
from slmops.settings import PlatformSettings
from slmops.stack.components import LOCAL_HOST, ComponentKind, ComponentSpec, StackError
from slmops.stack.state import (
    Report,
    find_supervisor,
    live_records,
    read_state,
    remove_state,
    state_path,
)


class PortInUseError(StackError):
    """A port the stack needs is taken (nothing was started)."""


class AlreadyRunningError(StackError):
    """The state file lists processes that are still alive."""


class DiskTooSmallError(StackError):
    """JetStream could not reserve the streams' size caps on the free disk."""


#: nats-server lets JetStream use 75 % of the free disk of its store unless told otherwise, and
#: reserves every stream's byte cap against it when the stream is created.
JETSTREAM_DISK_SHARE = 0.75


def check_can_start(specs: list[ComponentSpec], platform: PlatformSettings) -> None:
    """Every port free and, when NATS is started here, disk for its streams."""
    check_ports(specs)
    if any(spec.kind is ComponentKind.NATS for spec in specs):
        topology = Topology().sized(platform.jetstream_replicas, platform.stream_max_gb)
        check_disk(platform.var_dir.resolve(), topology)


def check_disk(store_dir: Path, topology: Topology, free_bytes: int | None = None) -> None:
    """Raise :class:`DiskTooSmallError` when the caps of ``topology``'s streams and buckets do
    not fit in what JetStream may use of the disk under ``store_dir`` - before anything starts,
    instead of every stream being refused later ("insufficient storage resources")."""
    reserved = sum(s.max_bytes * s.replicas for s in topology.streams)
    reserved += sum(b.max_bytes * b.replicas for b in topology.kv_buckets)
    if free_bytes is None:
        probe = store_dir
        while not probe.exists():  # the store folder is created later: its disk is the same
            probe = probe.parent
        free_bytes = shutil.disk_usage(probe).free
    usable = free_bytes * JETSTREAM_DISK_SHARE
    replicas = max((s.replicas for s in topology.streams), default=1)
    # a local cluster's nodes keep their stores on this same disk: each replica is a copy here
    copies = f", {replicas} replicas each" if replicas > 1 else ""
    if reserved > usable:
        raise DiskTooSmallError(
            f"JetStream reserves {reserved / GIB:.1f} GiB for the size caps of the streams and "
            f"buckets{copies}, but may use only {usable / GIB:.1f} GiB "
            f"({JETSTREAM_DISK_SHARE:.0%} of the {free_bytes / GIB:.1f} GiB free under "
            f"{store_dir}): free some disk space, or "
            "lower the caps with SLMOPS_STREAM_MAX_GB (JSON, GiB by stream, e.g. "
            '\'{"SLMOPS_FLEET": 0.5, "SLMOPS_PIPELINE": 0.5}\')'
        )


def check_ports(specs: list[ComponentSpec]) -> None:
    """Raise :class:`PortInUseError` unless every port of ``specs`` can be bound on 127.0.0.1."""
    seen: dict[int, str] = {}
    for spec in specs:
        for claim in spec.ports:
            what = f"{claim.purpose} of component {spec.name!r}"
            if not 0 < claim.port <= 65535:
                raise StackError(f"port {claim.port} ({what}) is out of range; set {claim.env_var}")
            if claim.port in seen:
                raise PortInUseError(
                    f"port {claim.port} is configured twice: {seen[claim.port]} and {what}; "
                    f"change {claim.env_var}"
                )
            seen[claim.port] = what
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # Like the servers themselves: TIME_WAIT leftovers do not count as taken.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((LOCAL_HOST, claim.port))
                except OSError as exc:
                    raise PortInUseError(
                        f"port {claim.port} on {LOCAL_HOST} ({what}) is already in use "
                        f"({exc.strerror}); stop whatever listens there or choose another port "
                        f"with {claim.env_var}=<port>"
                    ) from exc


@contextlib.contextmanager
def startup_lock(var_dir: Path) -> Iterator[None]:
    """Hold ``<var_dir>/stack.lock`` while starting, so two `slmops up` never interleave."""
    with (var_dir / "stack.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StackError(f"another `slmops up` is starting the stack in {var_dir}") from exc
        yield


def clear_stale_state(var_dir: Path, report: Report) -> None:
    """Refuse if the state file lists a live process; remove it if none of them is alive."""
    path = state_path(var_dir)
    state = read_state(path)
    if state is None:
        return
    alive = [f"{r.name} pid {r.pid}" for r in live_records(state)]
    supervisor = find_supervisor(state)
    if supervisor is not None:  # it may be restarting every component right now
        alive.insert(0, f"supervisor pid {supervisor.pid}")
    if alive:
        raise AlreadyRunningError(
            f"the local stack in {var_dir} is already running "
            f"({', '.join(alive)}); `slmops down` first"
        )
    report(f"removing stale state file {path} (none of its processes is running)")
    remove_state(path)
