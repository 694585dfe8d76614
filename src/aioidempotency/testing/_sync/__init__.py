"""The sync conformance kit: `contract.py` is generated from ``../_async``."""
