"""The in-memory store as a backend of the parametrised suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aioidempotency.persistence import InMemoryPersistenceLayer

BACKENDS = ["memory"]


@pytest.fixture
async def store_memory() -> AsyncIterator[InMemoryPersistenceLayer]:
    store = InMemoryPersistenceLayer()  # `async with` gives back a PersistenceLayer
    async with store:
        yield store
