"""How a long-running process of the platform uses Python's cyclic garbage collector.

CPython starts a collection of the youngest generation every 700 net allocations and, every
hundred of those, a full one that walks every tracked object (once enough new ones survived).
A service holds over a hundred thousand objects from its imports alone (the rollout
service: ~120,000 before it loads any state), and a fleet part tens
of thousands of simulated agents: measured in ``bench.fleet`` at 100,000 gateways, full
collections took half of a fleet part's CPU through a wave and ~8 % of the rollout
service's (1.1 of 13 s), walking objects that live as long as the process.

:func:`collect_less` is called once a process has built what it keeps: what exists then is
moved out of the collector's sight (``gc.freeze``: still freed by reference counting, only
never walked again), and collections run every 50,000 allocations instead of 700. Cyclic
garbage is still collected, a little later; most garbage is not cyclic and is freed at once.
The bus also pauses the collector while it decodes a batch (``slmops.bus.batches``).
"""

from __future__ import annotations

import gc

#: Allocations between two collections of the youngest generation, and how many collections
#: of each generation before the next older one is collected.
THRESHOLDS = (50_000, 20, 100)


def collect_less() -> None:
    """Collect once, freeze what survives, then collect at :data:`THRESHOLDS`."""
    gc.collect()  # garbage now must not be frozen with the rest (it would never be freed)
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
