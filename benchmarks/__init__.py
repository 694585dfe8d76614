"""Benchmarks of aioidempotency against Powertools and against the round-trip floor.

Run ``python -m benchmarks.run`` (full, a few minutes) or ``--smoke`` (seconds).
"""
