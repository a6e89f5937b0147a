"""The demo `make run` runs: real models from publish to a rolled-out simulated fleet.

``models`` finds the offline models, ``journey`` folds the platform's events into each model's
progress, ``flow`` drives the run (fleet, publish, rollout) and ``report`` sums it up. The
command itself is ``slmops demo`` (``slmops.cli.demo``).
"""
