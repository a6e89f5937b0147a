"""Models and versions; a version's lineage picture and variant charts; a variant's report."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from slmops_console.pages import proposals as proposals_page
from slmops_console.rendering import UpstreamDep, render
from slmops_console.session import Session, SignedIn
from slmops_console.upstream import Upstream, UpstreamError
from slmops_console.views import field as field_view
from slmops_console.views import lineage as lineage_view
from slmops_console.views import pareto

router = APIRouter(include_in_schema=False)


@router.get("/models", response_class=HTMLResponse)
async def models(request: Request, session: SignedIn, upstream: UpstreamDep) -> HTMLResponse:
    found = await upstream.get("registry", "/v1/models", session)
    for model in found:
        model["versions"].sort(key=lambda v: v["published_at"])
    found.sort(key=lambda m: m["model_name"])
    return render(request, "models.html", session, nav="models", models=found)


@router.get("/models/{name}/{version}", response_class=HTMLResponse)
async def version(
    name: str,
    version: str,
    request: Request,
    session: SignedIn,
    upstream: UpstreamDep,
    error: str = "",
) -> HTMLResponse:
    # Which gateways run each variant: the rollout service's counts (held in memory), not the
    # lineage's entry per gateway (thousands on a large fleet, read one by one).
    lineage, fleet, proposed = await asyncio.gather(
        upstream.get("registry", f"/v1/models/{name}/{version}/lineage", session, gateways="false"),
        upstream.get("rollout", "/v1/fleet", session, limit=1),
        _proposals(upstream, session, name, version),
    )
    by_variant = fleet["by_variant"]
    running = {v["variant_id"]: by_variant.get(v["variant_id"], 0) for v in lineage["variants"]}
    found, proposals_problem = proposed
    return render(
        request,
        "version.html",
        session,
        nav="models",
        lineage=lineage,
        picture=lineage_view.build(lineage, running),
        charts=pareto.charts(lineage),
        trace_id=None,
        field=field_view.of_lineage(lineage),
        proposals=await proposals_page.shown(found, request, session, upstream),
        unrecorded=field_view.lineage_only(lineage, found),
        proposals_problem=proposals_problem,
        error=error,
        here=f"/models/{name}/{version}",
    )


async def _proposals(
    upstream: Upstream, session: Session, name: str, version: str
) -> tuple[list[dict[str, Any]], str]:
    """This version's proposals as the rollout service holds them (their decisions), or why
    they are not shown (the page still shows the rest)."""
    try:
        found = await upstream.get("rollout", "/v1/proposals", session, model_name=name)
    except UpstreamError as exc:
        if exc.status == 401:
            raise
        return [], f"The rollout service did not list proposals: {exc.detail}"
    return [p for p in found if p["version"] == version], ""


@router.get("/variants/{variant_id}/report", response_class=HTMLResponse)
async def report(
    variant_id: str, request: Request, session: SignedIn, upstream: UpstreamDep
) -> HTMLResponse:
    found = await upstream.get("registry", f"/v1/variants/{variant_id}/report", session)
    return render(
        request, "report.html", session, nav="models", variant_id=variant_id, report=found["report"]
    )
