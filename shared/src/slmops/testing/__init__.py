"""Test helpers and pytest fixtures of the slmops SDK (loaded by the ``slmops`` pytest plugin)."""
