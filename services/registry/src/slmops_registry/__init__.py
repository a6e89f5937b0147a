"""slmops registry service."""
