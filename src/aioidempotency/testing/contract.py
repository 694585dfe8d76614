"""The conformance kit for store authors: the persistence contract as test classes.

- `AsyncStoreContract`: for a `PersistenceLayer` (async store);
- `StoreContract`: for a `SyncPersistenceLayer` (sync store), generated from the former.

Subclass one in a test module and override its `store` fixture::

    from aioidempotency.testing.contract import AsyncStoreContract


    class TestMyStore(AsyncStoreContract):
        @pytest.fixture
        def store(self) -> MyStore:
            return MyStore(...)

See docs/testing.md. This module needs pytest (``aioidempotency[testing]``); the
async kit also needs pytest-asyncio.
"""

import pytest

# Before the kit is imported: its failed assertions explain themselves.
pytest.register_assert_rewrite(
    "aioidempotency.testing._async.contract", "aioidempotency.testing._sync.contract"
)

from aioidempotency.testing._async.contract import (  # noqa: E402
    AsyncStoreContract,
    UnusableRecordWriter,
)
from aioidempotency.testing._sync.contract import (  # noqa: E402
    StoreContract,
    SyncUnusableRecordWriter,
)

__all__ = [
    "AsyncStoreContract",
    "StoreContract",
    "SyncUnusableRecordWriter",
    "UnusableRecordWriter",
]
