"""slmops optimizer.

Optimizer: turns a published model into variants per device class on Ray Serve.
"""
