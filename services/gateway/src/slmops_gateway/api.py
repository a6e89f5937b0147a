"""gateway HTTP API: its own resources under /v1.

Health, readiness and /v1/runtime come from the SDK for every service; this router grows the
gateway's resources: local inference and the current model slots (issue 6).
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["gateway"])
