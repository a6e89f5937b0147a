"""The cohorts' desired state as the rollout service writes it: one signed statement per
cohort, in KV (what a reconnecting gateway reads) and announced on the cohort's core NATS
subject (the notification its gateways act on at once).

A wave costs a KV write, a signature and a notification per cohort it reaches, whatever the
number of gateways in them (``slmops.cohorts``). The table is held in memory (at most
``COHORT_COUNT`` small states) and loaded once per process; one rollout service instance writes
it, as with the rollout state (``store.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind

from slmops.assignments import AssignmentSigner
from slmops.bus import Bus
from slmops.bus.kvstate import put_all, values_matching
from slmops.bus.permissions import COHORT_SUBJECT
from slmops.cohorts import COHORT_COUNT, COHORT_EVENT, CohortEntry, CohortState, cohort_key
from slmops.tracing import w3c_trace_headers

log = logging.getLogger(__name__)
_YIELD_EVERY = 16  # notifications published between two turns of the event loop
# Cohorts signed, stored and announced at a time. Signing one takes ~0.1 ms: a completing
# rollout reaches all 1,024 cohorts, and in one go that held the event loop for a fifth of a
# second while reports waited to be folded (bench.e2e); between chunks they are.
_CHUNK = 64


def cohort_subject(cohort: int) -> str:
    return f"{COHORT_SUBJECT}.{cohort_key(cohort)}"


class CohortTable:
    """Every cohort's newest state; ``reach`` adds entries, ``withdraw`` removes a rollout's."""

    def __init__(self, kv: KeyValue, bus: Bus, signer: AssignmentSigner | None) -> None:
        """``signer`` None: unsigned states (tests of the engine alone; a gateway with a trust
        root refuses them)."""
        self.kv, self.bus, self.signer = kv, bus, signer
        self.states: dict[int, CohortState] = {}
        self.withdrawn: set[str] = set()  # rollouts rolled back fleet-wide (this process)
        self._loaded = False
        self._lock = asyncio.Lock()  # one change of the table at a time: no lost entry

    async def load(self) -> None:
        if self._loaded:
            return
        async with self._lock:
            if self._loaded:
                return
            for raw in await values_matching(self.kv, ">"):
                state = CohortState.model_validate_json(raw)
                self.states[state.cohort] = state
            self._loaded = True

    def state(self, cohort: int) -> CohortState:
        return self.states.get(cohort) or CohortState(cohort=cohort, generation=0)

    def entry_of(self, cohort: int, rollout_id: str, device_class: str) -> CohortEntry | None:
        """``cohort``'s entry of ``rollout_id`` for ``device_class``, if it has one."""
        for entry in self.state(cohort).entries:
            if entry.rollout_id == rollout_id and entry.device_class == device_class:
                return entry
        return None

    def holds(self, cohort: int, rollout_id: str, device_class: str) -> bool:
        """Whether ``cohort`` has an entry of ``rollout_id`` for ``device_class``."""
        return self.entry_of(cohort, rollout_id, device_class) is not None

    async def reach(self, entries: dict[int, list[CohortEntry]], generation: int) -> None:
        """Add each cohort's entries (a new state per cohort, at ``generation``), store them,
        then announce them. A cohort that holds its rollout's entry for that class already (a
        wave sent again after a restart) is only announced again, unchanged: its gateways
        see the entry they follow and do nothing, one that missed it acts."""
        await self.load()
        async with self._lock:
            items = list(entries.items())
            for start in range(0, len(items), _CHUNK):
                changed: list[CohortState] = []
                again: list[CohortState] = []
                for cohort, news in items[start : start + _CHUNK]:
                    state = self.state(cohort)
                    fresh = [e for e in news if e.rollout_id not in self.withdrawn
                             and not self.holds(cohort, e.rollout_id, e.device_class)]  # fmt: skip
                    # a state's generation only rises (gateways take a lower one for a replay)
                    at = max(generation, state.generation + 1)
                    for entry in fresh:
                        state = state.with_entry(entry, at)
                    (changed if fresh else again).append(state)
                await self._publish(changed)
                await self._announce([(s, s.model_dump_json().encode()) for s in again])

    async def reach_rest(self, entries: list[CohortEntry], generation: int) -> int:
        """``entries`` into every cohort that lacks them (a completing rollout: gateways not
        registered when it was planned find it too); returns how many cohorts were written."""
        await self.load()
        rest = {}
        for cohort in range(COHORT_COUNT):
            news = [e for e in entries if not self.holds(cohort, e.rollout_id, e.device_class)]
            if news:
                rest[cohort] = news
        await self.reach(rest, generation)
        return len(rest)

    async def withdraw(self, rollout_id: str, generation: int) -> int:
        """Remove ``rollout_id``'s entries everywhere (the rollout was rolled back or cancelled)."""
        await self.load()
        async with self._lock:
            self.withdrawn.add(rollout_id)  # a chunk still in flight must not bring it back
            changed = [
                state.without_rollout(rollout_id, max(generation, state.generation + 1))
                for state in self.states.values()
                if any(e.rollout_id == rollout_id for e in state.entries)
            ]  # fmt: skip
            await self._publish(changed)
        return len(changed)

    async def renew(self) -> int:
        """Sign again (same generation, a new expiry) states past half their lifetime, so a
        gateway back after a long time finds a valid statement."""
        if self.signer is None:
            return 0
        await self.load()
        async with self._lock:
            half_s, now = self.signer.ttl_s / 2, time.time()
            stale = [s for s in self.states.values()
                     if (s.statement_expires_at or 0) - now < half_s]  # fmt: skip
            await self._publish(stale, announce=False)
        return len(stale)

    async def _publish(self, states: Iterable[CohortState], *, announce: bool = True) -> None:
        """Sign, store (pipelined), then announce each state, ``_CHUNK`` at a time; the table
        holds them after."""
        pending = list(states)
        for start in range(0, len(pending), _CHUNK):
            chunk = pending[start : start + _CHUNK]
            signed = [self.signer.sign_cohort(s) if self.signer else s for s in chunk]
            bodies = [s.model_dump_json().encode() for s in signed]
            await put_all(self.kv, [(cohort_key(s.cohort), body)
                                    for s, body in zip(signed, bodies, strict=True)])  # fmt: skip
            for state in signed:
                self.states[state.cohort] = state
            if announce:
                await self._announce(list(zip(signed, bodies, strict=True)))

    async def _announce(self, published: Sequence[tuple[CohortState, bytes]]) -> None:
        """One notification per cohort (its stored body), under one producer span per call
        (a chunk), in the trace of whoever acts (a rollout's journey): the gateways' spans
        of acting on them are its children. A span per notification cost as much as signing
        the state (a completing rollout announces all 1,024 cohorts)."""
        if not published:
            return
        nc = self.bus.nc
        with self.bus.tracer.start_as_current_span(
            f"publish {COHORT_EVENT}", kind=SpanKind.PRODUCER,
            attributes={"messaging.destination.template": f"{COHORT_SUBJECT}.*",
                        "messaging.batch.message_count": len(published),
                        "slmops.cohorts": [state.cohort for state, _ in published]},
        ) as span:  # fmt: skip
            headers = w3c_trace_headers(span.get_span_context()) or None
            for n, (state, body) in enumerate(published, 1):
                if n % _YIELD_EVERY == 0:  # let nats-py's flusher send what is buffered: a
                    await asyncio.sleep(0)  # burst would otherwise leave only at its end
                await nc.publish(cohort_subject(state.cohort), body, headers=headers)
        await nc.flush()
