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


def status_json(components: list[ComponentStatus] | None) -> dict[str, object]:
    """The `slmops status --json` document."""
    items = components or []
    return {
        "running": components is not None,
        "ready": bool(items) and all(item.ready for item in items),
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
