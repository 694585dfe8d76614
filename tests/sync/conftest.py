"""The generated sync tests run against every store backend too: `store` is the store a
sync engine uses for each backend's store, built as users build it.

- memory and cache backends: `as_sync_store` of the async backend's store (the in-memory
  store's table shared; a cache store from a URL opens its own sync client);
- DynamoDB backends: the sync twin of a layer given boto3's session or client
  (`sync_store_dynamodb_*`, tests/backends/dynamodb.py), the native
  `SyncDynamoDBPersistenceLayer`;
- `dynamodb_bridged`: the async `dynamodb_simple` store, on an aiobotocore session, so
  a `BridgedStore`. It is the one networked store the engine's suites run through the
  bridge's background loop (tests/sync/test_bridge.py, test_decorators_bridged.py and
  tests/persistence/test_store_twins.py drive the bridge over an in-memory store, and
  over DynamoDB only for a few calls at exit).

The fixture checks the kind of each: a backend reaching the bridge by accident fails.
"""

from __future__ import annotations

import pytest

from aioidempotency._sync.bridge import BridgedStore
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from aioidempotency._sync.memory import SyncInMemoryPersistenceLayer
from aioidempotency._sync.store import SyncPersistenceLayer
from aioidempotency._twins import as_sync_store
from tests.backends import cache, dynamodb, memory

BRIDGED = "dynamodb_bridged"

SYNC_BACKENDS: dict[str, type[SyncPersistenceLayer]] = {
    **dict.fromkeys(memory.BACKENDS, SyncInMemoryPersistenceLayer),
    **dict.fromkeys(cache.BACKENDS, SyncCachePersistenceLayer),
    **dict.fromkeys(dynamodb.BACKENDS, SyncDynamoDBPersistenceLayer),
    BRIDGED: BridgedStore,
}
"""Each backend of the sync suites and the kind of store its `store` must be."""


@pytest.fixture(params=list(SYNC_BACKENDS))
def store(request: pytest.FixtureRequest) -> SyncPersistenceLayer:
    """A fresh store of each backend in turn, as a sync engine would use it."""
    name: str = request.param
    if name in dynamodb.BACKENDS:
        layer = request.getfixturevalue(f"sync_store_{name}")
    elif name == BRIDGED:
        layer = as_sync_store(request.getfixturevalue("store_dynamodb_simple"))
    else:
        layer = as_sync_store(request.getfixturevalue(f"store_{name}"))
    assert type(layer) is SYNC_BACKENDS[name], f"{name}: {type(layer).__name__}"
    return layer
