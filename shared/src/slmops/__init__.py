"""slmops SDK: the contracts and runtime every slmops service stands on."""

__version__ = "0.1.0"
