"""DynamoDB backends on moto's server (issue 4 fills this in)."""

BACKENDS: list[str] = []
