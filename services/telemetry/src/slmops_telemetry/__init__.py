"""slmops telemetry.

Telemetry: the fleet's health reports folded per variant and class; field gates, regressions
and drift found in them.
"""
