"""slmops validator.

Validator: per-device-class gates with evidence, and releases.
"""
