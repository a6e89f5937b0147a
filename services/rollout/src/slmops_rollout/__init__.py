"""slmops rollout.

Rollout: staged rollouts gated by on-device health, with rollback.
"""
