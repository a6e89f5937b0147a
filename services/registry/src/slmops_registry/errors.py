"""The registry's refusal: an HTTP status and a reason a person can act on."""

from __future__ import annotations


class RegistryError(Exception):
    """Bad input or a conflict; the API answers ``status`` with ``{"detail": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason
