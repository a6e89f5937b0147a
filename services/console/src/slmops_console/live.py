"""What makes a console page live: the platform's own events, as they are published.

The console listens to rollout events and gateway reports with plain NATS subscriptions (it
reads the subjects the streams capture, so it creates no consumer and stores nothing) and
counts changes per rollout. A live page waits for its rollout's count to move, then is
re-rendered from the API (at most once per ``live_interval_s``): the events say *when*, the
API says *what*, so a page never shows a state the platform does not hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from slmops.bus.permissions import CONSOLE_SUBJECTS, REPORTS_SUBJECT
from slmops.service import BackgroundTask, Check, ServiceRuntime

log = logging.getLogger(__name__)

#: Subjects the console's bus identity may subscribe to.
LIVE_SUBJECTS = CONSOLE_SUBJECTS
#: The key every rollout event also bumps (the rollouts list).
ANY_ROLLOUT = "*"


class LiveFeed(BackgroundTask):
    """Counts changes per rollout from the bus; pages wait on :meth:`changed`."""

    task_name = "console live feed"

    def __init__(self, runtime: ServiceRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.versions: defaultdict[str, int] = defaultdict(int)
        self.received = 0
        self._pulse = asyncio.Event()
        self._subscriptions: list[Subscription] = []

    async def run(self) -> None:
        while not self._subscriptions:
            bus = self.runtime.bus
            if bus is None or not bus.connected:
                await asyncio.sleep(0.2)
                continue
            for subject in LIVE_SUBJECTS:  # nats-py subscribes again after a reconnect
                self._subscriptions.append(await bus.nc.subscribe(subject, cb=self._on_message))
        await asyncio.Event().wait()  # the subscriptions deliver until the runtime stops

    async def check(self) -> Check:
        if not self._subscriptions:
            return Check(False, "not subscribed to the platform's events yet")
        return Check(True, f"subscribed to {', '.join(LIVE_SUBJECTS)}; {self.received} received")

    async def _on_message(self, msg: Msg) -> None:
        self.received += 1
        try:
            data = json.loads(msg.data).get("data", {})
            reports = data.get("reports") if msg.subject.startswith(REPORTS_SUBJECT) else [data]
            rollout_ids = {r.get("rollout_id") for r in reports}  # a site's batch: several
        except (ValueError, AttributeError, TypeError):
            return  # not an event of ours: nothing to show
        rollout_ids = {r for r in rollout_ids if isinstance(r, str)}
        if not rollout_ids:
            return
        for rollout_id in rollout_ids:
            self.versions[rollout_id] += 1
        if msg.subject.startswith("slmops.rollout."):
            self.versions[ANY_ROLLOUT] += 1
        pulse, self._pulse = self._pulse, asyncio.Event()
        pulse.set()

    async def changed(self, key: str, seen: int, timeout_s: float) -> int:
        """``key``'s change count once it differs from ``seen`` (or at the timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.versions.get(key, 0) == seen:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._pulse.wait(), remaining)
            except TimeoutError:
                break
        return self.versions.get(key, 0)
