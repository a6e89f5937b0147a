"""`slmops down` and `slmops status` from the state file alone (any process can run them)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.stack.components import ComponentKind, probe
from slmops.stack.state import (
    Report,
    find_process,
    read_state,
    remove_state,
    state_path,
    stop_components,
    write_state,
)


def stop_stack(
    var_dir: Path, timeout_s: float, report: Report, force: threading.Event | None = None
) -> bool:
    """`slmops down`: stop every recorded process, remove the state file. False if none."""
    path = state_path(var_dir.resolve())
    state = read_state(path)
    if state is None:
        return False
    state.stopping = True
    write_state(path, state)
    stop_components(state.components, timeout_s, report, force)
    remove_state(path)
    return True


@dataclass(frozen=True)
class ComponentStatus:
    """One component as `slmops status` reports it."""

    name: str
    kind: ComponentKind
    pid: int
    alive: bool
    ready: bool
    url: str
    urls: dict[str, str]
    detail: str
    body: object
    log_path: str


def stack_status(var_dir: Path, timeout_s: float = 2.0) -> list[ComponentStatus] | None:
    """Probe every recorded component; None if there is no state file."""
    state = read_state(state_path(var_dir.resolve()))
    if state is None:
        return None
    result = []
    for record in state.components:
        alive = find_process(record) is not None
        if alive:
            answer = probe(record.kind, record.ready_url, timeout_s)
            ready, detail, body = answer.ready, answer.detail, answer.body
        else:
            ready, detail, body = False, "process not running", None
        main_url = record.urls.get(record.kind.value) or record.urls.get("http", "")
        result.append(
            ComponentStatus(
                name=record.name,
                kind=record.kind,
                pid=record.pid,
                alive=alive,
                ready=ready,
                url=main_url,
                urls=record.urls,
                detail=detail,
                body=body,
                log_path=record.log_path,
            )
        )
    return result


#: `slmops status` warns when a stream or bucket holds this share of its size cap.
WARN_SHARE = 0.8


@dataclass(frozen=True)
class StorageUse:
    """One JetStream stream (KV buckets are streams ``KV_<bucket>``) against its cap."""

    name: str
    bytes: int
    max_bytes: int  # -1: no cap
    messages: int
    replicas: int

    @property
    def share(self) -> float | None:
        return self.bytes / self.max_bytes if self.max_bytes > 0 else None

    def warning(self) -> str | None:
        share = self.share
        if share is None:
            return f"{self.name} has no size cap"
        if share >= WARN_SHARE:
            return (f"{self.name} holds {share:.0%} of its {self.max_bytes / 2**30:g} GiB cap: "
                    "raise SLMOPS_STREAM_MAX_GB or its retention will drop (or, for the event "
                    "log, refuse) messages")  # fmt: skip
        return None


def storage_use(components: list[ComponentStatus], timeout_s: float = 2.0) -> list[StorageUse]:
    """Every stream's size and cap from NATS's monitoring endpoint (``/jsz``); empty when NATS
    is not part of the stack or not answering."""
    import httpx

    monitor = next((c.urls.get("monitor") for c in components if c.name == "nats"), None)
    if not monitor:
        return []
    try:
        answer = httpx.get(f"{monitor}/jsz", params={"streams": "true", "config": "true"},
                           timeout=timeout_s, trust_env=False)  # fmt: skip
        details = answer.json().get("account_details") or []
    except (httpx.HTTPError, ValueError):
        return []
    return sorted(
        (StorageUse(name=s["name"], bytes=s["state"]["bytes"],
                    max_bytes=s["config"].get("max_bytes", -1),
                    messages=s["state"]["messages"],
                    replicas=s["config"].get("num_replicas", 1))
         for account in details for s in account.get("stream_detail") or []),
        key=lambda use: use.name,
    )  # fmt: skip


def status_json(
    components: list[ComponentStatus] | None, storage: list[StorageUse] | None = None
) -> dict[str, object]:
    """The `slmops status --json` document."""
    items = components or []
    uses = storage or []
    return {
        "running": components is not None,
        "ready": bool(items) and all(item.ready for item in items),
        "storage": [{**vars(u), "share": u.share} for u in uses],
        "warnings": [w for u in uses if (w := u.warning())],
        "components": {
            item.name: {
                "kind": item.kind.value,
                "pid": item.pid,
                "alive": item.alive,
                "ready": item.ready,
                "url": item.url,
                "urls": item.urls,
                "detail": item.detail,
                "body": item.body,
                "log": item.log_path,
            }
            for item in items
        },
    }


def stack_urls(document: Mapping[str, Any]) -> dict[str, str]:
    """Where a running stack listens, from its `slmops status --json` document: each
    service's base URL by name, and ``nats``."""
    components = document["components"]
    urls = {name: c["urls"].get("http", "") for name, c in components.items()}
    urls["nats"] = components["nats"]["urls"]["nats"]
    return urls
