"""The sync twin: modules generated from ``_async`` by tools/unasync.py, and the
hand-written thread-based primitives, lease keeper and store bridge they use."""
