"""rollout HTTP API: its own resources under /v1.

Health, readiness and /v1/runtime come from the SDK for every service; this router grows the
rollout's resources: rollouts: start, status, approve, pause, resume, cancel, rollback (issue 6).
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["rollout"])
