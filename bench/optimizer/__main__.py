"""``python -m bench.optimizer``: the bench; with ``--ray-replicas N``, one Ray Serve run."""

from __future__ import annotations

import sys

from bench.optimizer import main
from bench.optimizer.serve_throughput import ray_child

if __name__ == "__main__":
    if "--ray-replicas" in sys.argv:
        ray_child(sys.argv[1:])
    else:
        main()
