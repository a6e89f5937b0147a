"""The ``slmops`` command line."""
