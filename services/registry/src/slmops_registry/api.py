"""registry HTTP API: its own resources under /v1.

Health, readiness and /v1/runtime come from the SDK for every service; this router grows the
registry's resources: publish, models, manifests, lineage, channels, downloads (issue 3).
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["registry"])
