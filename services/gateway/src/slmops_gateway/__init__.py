"""slmops gateway service."""
