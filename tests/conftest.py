"""Suite-wide fixtures: `store` runs a test against every backend."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.backends", "tests.servers", "tests.helpers")

from aioidempotency.persistence import PersistenceLayer  # noqa: E402
from tests.backends import cache, dynamodb, memory  # noqa: E402

pytest_plugins = ["tests.backends.memory", "tests.backends.cache", "tests.backends.dynamodb"]

ALL_BACKENDS = [*memory.BACKENDS, *cache.BACKENDS, *dynamodb.BACKENDS]


@pytest.fixture(params=ALL_BACKENDS)
def store(request: pytest.FixtureRequest) -> PersistenceLayer:
    """A fresh store of each backend in turn."""
    layer = request.getfixturevalue(f"store_{request.param}")
    assert isinstance(layer, PersistenceLayer)
    return layer
