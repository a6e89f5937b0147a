"""Job records in JetStream KV (``slmops-jobs``, keys ``optimizer.<job id>``).

The API lists and cancels from here; the service updates state and progress while it streams a
job from its compute replica. Updates are compare-and-set, so a cancel request written by the
API is never lost under a concurrent progress write, and any optimizer instance sees it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from slmops_optimizer.jobspec import TERMINAL_STATES, JobRecord, JobSpec

_PREFIX = "optimizer."


class JobNotFound(LookupError):
    pass


class JobStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, spec: JobSpec) -> JobRecord:
        """A queued record; a redelivered event restarts the job's record from scratch."""
        now = datetime.now(UTC)
        record = JobRecord(
            job_id=spec.job_id,
            model_name=spec.model_name,
            version=spec.version,
            device_class=spec.device_class,
            recipe_name=spec.recipe.name,
            created_at=now,
            updated_at=now,
        )
        await self.kv.put(_PREFIX + spec.job_id, record.model_dump_json().encode())
        return record

    async def get(self, job_id: str) -> JobRecord:
        record, _ = await self._read(job_id)
        return record

    async def update(self, job_id: str, **changes: Any) -> JobRecord:
        """Apply ``changes`` with compare-and-set, re-reading on a concurrent write."""
        for _ in range(20):
            record, revision = await self._read(job_id)
            updated = record.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
            try:
                await self.kv.update(
                    _PREFIX + job_id, updated.model_dump_json().encode(), last=revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return updated
        raise RuntimeError(f"job {job_id}: too many concurrent updates")

    async def request_cancel(self, job_id: str) -> JobRecord:
        record = await self.get(job_id)
        if record.state in TERMINAL_STATES:
            return record
        return await self.update(job_id, cancel_requested=True)

    async def list(
        self, *, model_name: str | None = None, state: str | None = None
    ) -> list[JobRecord]:
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        records = []
        for key in keys:
            if not key.startswith(_PREFIX):
                continue
            try:
                record, _ = await self._read(key.removeprefix(_PREFIX))
            except JobNotFound:  # deleted meanwhile
                continue
            if (model_name is None or record.model_name == model_name) and (
                state is None or record.state == state
            ):
                records.append(record)
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    async def _read(self, job_id: str) -> tuple[JobRecord, int]:
        try:
            entry = await self.kv.get(_PREFIX + job_id)
        except nats.js.errors.KeyNotFoundError as exc:
            raise JobNotFound(job_id) from exc
        if not entry.value:
            raise JobNotFound(job_id)
        return JobRecord.model_validate_json(entry.value), int(entry.revision or 0)
