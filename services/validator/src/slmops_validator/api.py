"""validator HTTP API: its own resources under /v1.

Health, readiness and /v1/runtime come from the SDK for every service; this router grows the
validator's resources: reports per variant (issue 5).
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["validator"])
