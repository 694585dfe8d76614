"""The async source of the conformance kit; tools/unasync.py generates ``../_sync``."""
