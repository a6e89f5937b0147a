"""slmops rollout service."""
