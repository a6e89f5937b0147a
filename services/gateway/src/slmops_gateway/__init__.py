"""slmops gateway.

Gateway agent: receives assignments, verifies, hot-swaps, serves locally.
"""
