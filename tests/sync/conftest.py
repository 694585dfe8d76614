"""The generated sync tests run against every store backend too: `store` is the sync
twin (`as_sync_store`) of each backend's store, as a sync engine given it would use."""

from __future__ import annotations

import pytest

from aioidempotency._sync.store import SyncPersistenceLayer
from aioidempotency._twins import as_sync_store
from aioidempotency.persistence import PersistenceLayer


@pytest.fixture
def store(store: PersistenceLayer) -> SyncPersistenceLayer:
    """The sync twin of a fresh store of each backend in turn (tests/conftest.py)."""
    return as_sync_store(store)
