"""The trust root's TUF repository, served read-only: what gateways' ngclient fetches.

The files are written on the trusted host that holds the keys (``slmops.trust.repository``);
the registry only serves ``metadata/`` and ``targets/`` from ``trust_dir`` and never reads its
``keys/``. Everything here is signed, so a cache or a proxy in between can delay it (until the
timestamp expires) but not change it.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import Response

from slmops_registry.api import Installer
from slmops_registry.errors import RegistryError

router = APIRouter(prefix="/v1/trust", tags=["trust"])

#: ``root.json``, ``3.root.json``, ``timestamp.json``, ``keys.json``: one plain file name.
_FILE_NAME = re.compile(r"^(?:[0-9]{1,9}\.)?[a-z][a-z0-9_-]{0,63}\.json$")


def _read(request: Request, folder: str, name: str) -> Response:
    if not _FILE_NAME.fullmatch(name):
        raise RegistryError(422, f"invalid trust file name {name!r}")
    root = request.app.state.registry.settings.trust_root_dir()
    try:
        data = (root / folder / name).read_bytes()
    except FileNotFoundError:
        # ngclient asks for the next root version until one is missing: a plain 404.
        raise RegistryError(404, f"no {folder}/{name} in the trust repository") from None
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-cache"})


@router.get("/metadata/{name}", summary="TUF metadata: root (and its versions), timestamp, ...")
async def metadata(name: str, request: Request, _: Installer) -> Response:
    return _read(request, "metadata", name)


@router.get("/targets/{name}", summary="TUF targets: keys.json, the keys of each signing role")
async def targets(name: str, request: Request, _: Installer) -> Response:
    return _read(request, "targets", name)
