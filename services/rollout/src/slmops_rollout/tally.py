"""The current wave's figures kept as counts, moved by the gateways each commit names.

Counting a wave of 100,000 afresh takes tens of ms. The ticker did so whenever reports had
changed it (throttled to 1/20 of the service's time, so a decision could wait a second at
100,000): ~6 % of the rollout service's CPU in ``bench.fleet`` with one report per message.
Every change of a gateway's progress is committed naming that gateway (``LiveRollout.commit``:
that is what makes it durable), so the tally moves by exactly those: it remembers what it
counted of each gateway (status, assigned at) and swaps the old for the new.

Silence is a matter of time, not of reports: the waiting gateways are counted per moment they
were assigned (a wave is sent in chunks that share one moment: about a hundred for a wave of
100,000), so the silent ones at ``now`` are a sum over those moments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

from slmops_rollout.state import WAITING, RolloutState, WaveFigures

Counted = tuple[str, datetime | None]  # what the tally counted of a gateway: status, assigned at


class WaveTally:
    """Figures of one rollout's current wave; counted afresh only when the wave changes (the
    next wave, a wave planned anew, a rollout loaded after a restart)."""

    def __init__(self) -> None:
        self._wave: list[str] | None = None  # the wave counted (held: compared by identity)
        self._gateways: object = None  # the progress it was counted from, likewise
        self._index = -1
        self._counted: dict[str, Counted] = {}
        self._statuses: Counter[str] = Counter()
        self._waiting_since: Counter[datetime] = Counter()

    def moved(self, state: RolloutState, gateway_ids: Iterable[str]) -> None:
        """``gateway_ids`` changed (committed, or undone before they were)."""
        if not self._current(state):
            return  # counted afresh when asked
        gateways, counted = state.gateways, self._counted
        for gateway_id in gateway_ids:
            before = counted.get(gateway_id)
            if before is None:
                continue  # not in the current wave
            progress = gateways[gateway_id]
            now = (progress.status, progress.assigned_at)
            if now != before:
                self._count(before, -1)
                self._count(now, 1)
                counted[gateway_id] = now

    def figures(self, state: RolloutState, now: datetime) -> WaveFigures:
        """As ``state.figures`` counts them afresh."""
        if not self._current(state):
            self._recount(state)
        cutoff = now - timedelta(seconds=state.policy.silent_timeout_s)
        silent = sum(n for assigned_at, n in self._waiting_since.items() if assigned_at < cutoff)
        statuses, targets = self._statuses, len(self._counted)
        applied, failed = statuses["applied"], statuses["failed"]
        rolled_back = statuses["rolled_back"]
        return WaveFigures(
            targets=targets, acknowledged=targets - statuses["pending"] - statuses["assigned"],
            applied=applied, failed=failed, silent=silent, rolled_back=rolled_back,
            waiting=targets - applied - failed - silent - rolled_back,
        )  # fmt: skip

    def _current(self, state: RolloutState) -> bool:
        index = state.wave_index
        wave = state.waves[index] if index < len(state.waves) else None
        return (index == self._index and wave is self._wave
                and state.gateways is self._gateways)  # fmt: skip

    def _recount(self, state: RolloutState) -> None:
        index = state.wave_index
        wave = state.waves[index] if index < len(state.waves) else None
        self._index, self._wave, self._gateways = index, wave, state.gateways
        self._statuses.clear()
        self._waiting_since.clear()
        gateways = state.gateways
        self._counted = {g: (gateways[g].status, gateways[g].assigned_at) for g in wave or ()}
        for counted in self._counted.values():
            self._count(counted, 1)

    def _count(self, counted: Counted, by: int) -> None:
        status, assigned_at = counted
        self._statuses[status] += by
        if status in WAITING and assigned_at is not None:
            waiting = self._waiting_since
            waiting[assigned_at] += by
            if not waiting[assigned_at]:
                del waiting[assigned_at]  # kept to the moments still waited on
