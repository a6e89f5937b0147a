"""The fleet: gateways by class, label and what they run, a page at a time."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from slmops_console.rendering import SettingsDep, UpstreamDep, render
from slmops_console.session import Session, SignedIn
from slmops_console.upstream import Upstream, UpstreamError

router = APIRouter(include_in_schema=False)


class VariantNames:
    """``variant id -> "model version · recipe"``: variant ids name immutable content, so a
    name once found is kept (bounded by the variants a fleet runs)."""

    def __init__(self) -> None:
        self.known: dict[str, str] = {}

    async def names(self, ids: list[str], session: Session, upstream: Upstream) -> dict[str, str]:
        missing = [i for i in ids if i and i not in self.known]
        found = await asyncio.gather(
            *(upstream.get("registry", f"/v1/variants/{i}", session) for i in missing),
            return_exceptions=True,
        )
        for variant_id, answer in zip(missing, found, strict=True):
            if isinstance(answer, UpstreamError | BaseException):
                continue  # shown by id; tried again on the next page
            manifest = answer["manifest"]
            recipe = (manifest.get("recipe") or {}).get("name", "?")
            self.known[variant_id] = f"{manifest['model_name']} {manifest['version']} · {recipe}"
        return {i: self.known.get(i, i) for i in ids}


@router.get("/fleet", response_class=HTMLResponse)
async def fleet(
    request: Request,
    session: SignedIn,
    upstream: UpstreamDep,
    settings: SettingsDep,
    device_class: str = "",
    variant: str = "",
    status: str = "",
    selector: str = "",
    prefix: str = "",
    offset: int = 0,
) -> HTMLResponse:
    filters = {
        "device_class": device_class,
        "variant": variant,
        "status": status,
        "selector": selector,
        "prefix": prefix,
    }
    labels = [s.strip() for s in selector.split(",") if "=" in s]
    query: dict[str, Any] = {
        "device_class": device_class or None,
        "status": status or None,
        "prefix": prefix or None,
        "variant": "" if variant == "none" else (variant or None),
        "offset": max(0, offset),
        "limit": settings.page_size,
        "selector": labels or None,
    }
    page = await upstream.get("rollout", "/v1/fleet", session, **query)
    names: VariantNames = request.app.state.variant_names
    variants = await names.names(sorted(page["by_variant"]), session, upstream)

    def href(at: int) -> str:
        kept = {k: v for k, v in filters.items() if v}
        return "/fleet?" + urlencode({**kept, "offset": max(0, at)})

    return render(
        request,
        "fleet.html",
        session,
        nav="fleet",
        page=page,
        filters=filters,
        variants=variants,
        prev_href=href(page["offset"] - settings.page_size),
        next_href=href(page["offset"] + settings.page_size),
    )
