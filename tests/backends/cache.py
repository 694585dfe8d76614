"""Redis and Valkey backends (issue 3 fills this in)."""

BACKENDS: list[str] = []
