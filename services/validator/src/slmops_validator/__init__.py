"""slmops validator service."""
