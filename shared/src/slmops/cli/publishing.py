"""Publishing a model version through the registry's API, as `slmops publish` and the demo do:
stream the artifact (and evaluation set) to ``POST /v1/blobs`` with its digest computed
beforehand, then ``POST /v1/models`` referencing them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from slmops.cli import packaging as pkg
from slmops.cli.common import CliError, ServiceClient, console_err


def upload(
    client: ServiceClient, path: Path, digest: str, size: int, label: str, progress: bool,
    on_bytes: Callable[[int], None] | None = None,
) -> None:  # fmt: skip
    """Stream ``path`` to ``POST /v1/blobs`` in 1 MiB chunks, with a progress bar (or
    ``on_bytes`` told of each chunk, for a caller that shows its own progress)."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=console_err,
        disable=not progress or on_bytes is not None,
    )
    headers = {"Content-Length": str(size), "X-Expected-Digest": digest}
    with bar:
        task = bar.add_task(f"uploading {label}", total=size)
        chunks = pkg.iter_chunks(path, on_bytes or (lambda n: bar.advance(task, n)))
        stored = client.call("POST", "/v1/blobs", content=chunks, headers=headers, slow=True)
    if (answer := stored.json().get("digest")) != digest:
        raise CliError(f"the registry stored {label} as {answer}, not {digest}")


def publish_version(
    client: ServiceClient, path: Path, fmt: str, fields: dict[str, Any], *,
    eval_set: Path | None = None, progress: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> httpx.Response:  # fmt: skip
    """Upload the artifact at ``path`` (a folder packed as a tar) and its evaluation set,
    then ``POST /v1/models`` with ``fields`` (name, version, task, ...) referencing them."""
    with pkg.prepared_artifact(path, fmt) as artifact:
        upload(client, artifact.path, artifact.digest, artifact.size_bytes, path.name,
               progress, on_bytes)  # fmt: skip
        eval_digest = None
        if eval_set is not None:
            eval_digest, eval_size = pkg.hash_file(eval_set)
            upload(client, eval_set, eval_digest, eval_size, eval_set.name, progress, on_bytes)
        body = {**fields, "format": fmt, "artifact_digest": artifact.digest,
                "eval_set_digest": eval_digest}  # fmt: skip
        return client.call("POST", "/v1/models", json=body, slow=True)
