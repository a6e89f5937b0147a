"""slmops optimizer service."""
