"""Channels: per model and device class, named pointers (``stable``, ``canary``, custom) to a
variant, with their history. Pure projection, like :mod:`slmops_registry.lineage`.

Moves come from events only, so channels are rebuilt with the rest of the index:
``release.created`` points ``canary`` at each class's released variant; ``rollout.completed``
points ``stable`` at the variants of the release it rolled out; ``rollout.rolled_back`` points
``canary`` back at what ``stable`` holds; an operator's move through the API is published as
``channel.moved``. The current target of a channel is its newest move (event time, then id),
whatever order the moves were folded in.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

STABLE, CANARY = "stable", "canary"


class Move(BaseModel):
    event_id: str
    time: datetime
    channel: str
    version: str
    variant_id: str
    cause: str = Field(description="The event type that moved it.")
    reason: str = ""
    moved_by: str = ""

    def key(self) -> tuple[datetime, str]:
        return (self.time, self.event_id)


class ChannelBook(BaseModel):
    """Every channel of one model for one device class."""

    model_name: str
    device_class: str
    history: list[Move] = Field(default_factory=list)

    def add(self, move: Move) -> bool:
        if any(m.event_id == move.event_id and m.channel == move.channel for m in self.history):
            return False
        self.history.append(move)
        self.history.sort(key=lambda m: (m.key(), m.channel))
        return True

    def current(self) -> dict[str, Move]:
        heads: dict[str, Move] = {}
        for move in self.history:  # sorted oldest first: the last one per channel wins
            heads[move.channel] = move
        return heads

    def to_api(self) -> dict[str, Any]:
        return {
            "device_class": self.device_class,
            "channels": {
                name: move.model_dump(mode="json", exclude={"channel"})
                for name, move in sorted(self.current().items())
            },
            "history": [m.model_dump(mode="json") for m in self.history],
        }
