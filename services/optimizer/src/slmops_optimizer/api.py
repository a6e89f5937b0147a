"""optimizer HTTP API: its own resources under /v1.

Health, readiness and /v1/runtime come from the SDK for every service; this router grows the
optimizer's resources: jobs: list with state and progress, cancel (issue 4).
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["optimizer"])
