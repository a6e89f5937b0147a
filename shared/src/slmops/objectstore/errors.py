"""Errors of the object store client, each saying what was expected and what was found."""

from __future__ import annotations


class ObjectStoreError(Exception):
    """Base of every error raised by :class:`ObjectStore`."""


class ObjectStoreUnavailable(ObjectStoreError):
    """The store can't be reached, refuses our credentials, or the bucket is missing."""


class InvalidDigestError(ObjectStoreError, ValueError):
    """A digest string isn't ``sha256:`` followed by 64 lowercase hex characters."""


class ObjectNotFoundError(ObjectStoreError):
    """The requested blob or document doesn't exist."""


class _Mismatch(ObjectStoreError):
    def __init__(self, what: str, expected: object, actual: object) -> None:
        super().__init__(f"{what}: expected {expected}, got {actual}")
        self.expected, self.actual = expected, actual


class DigestMismatchError(_Mismatch):
    """Uploaded data doesn't hash to the announced digest; nothing was stored."""


class SizeMismatchError(_Mismatch):
    """Uploaded data isn't as long as announced (a truncated upload); nothing was stored."""


class CorruptObjectError(_Mismatch):
    """A stored blob doesn't hash to its own key: the store returned damaged data."""
