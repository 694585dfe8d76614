"""Stores for idempotency records, and the interface for writing one.

Users pick a store: `InMemoryPersistenceLayer`, `CachePersistenceLayer` (Redis and
Valkey through redis-py, valkey-glide or any `CacheClient`; `RedisCachePersistenceLayer`
is its Powertools name), `DynamoDBPersistenceLayer`,
or `store_from_url`; each serves async and sync code alike. Store writers subclass
`PersistenceLayer` (async) or `SyncPersistenceLayer` (sync) and return `ClaimResult`s
holding `DataRecord`s; `RecordAttributes` names a record's stored attributes (and
reads and writes them), for the stores above as for one's own. Every store has
``check()``, which returns a `StoreCheckReport` of the `StoreProblem`s it finds.
A layer written for Powertools (a `BasePersistenceLayer` subclass) serves our engines
through `PowertoolsStoreAdapter`.

Everything imports without the optional extras; a store whose client library is
missing says what to install when it is built.
"""

from aioidempotency._async.cache import (
    CacheClient,
    CachePersistenceLayer,
    RedisCachePersistenceLayer,
)
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer, create_idempotency_table
from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._async.store import ClaimResult, PersistenceLayer
from aioidempotency._check import StoreCheckReport, StoreProblem
from aioidempotency._powertools_store import PowertoolsStoreAdapter, SyncPowertoolsStoreAdapter
from aioidempotency._records import DataRecord, RecordAttributes, RecordStatus
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from aioidempotency._sync.memory import SyncInMemoryPersistenceLayer
from aioidempotency._sync.store import SyncPersistenceLayer
from aioidempotency._urls import store_from_url

__all__ = [
    # stores
    "CachePersistenceLayer",
    "DynamoDBPersistenceLayer",
    "InMemoryPersistenceLayer",
    "RedisCachePersistenceLayer",
    "SyncCachePersistenceLayer",
    "SyncDynamoDBPersistenceLayer",
    "SyncInMemoryPersistenceLayer",
    "store_from_url",
    # layers written for Powertools
    "PowertoolsStoreAdapter",
    "SyncPowertoolsStoreAdapter",
    # checking a store (`await store.check()`)
    "StoreCheckReport",
    "StoreProblem",
    # writing a store
    "CacheClient",
    "ClaimResult",
    "DataRecord",
    "PersistenceLayer",
    "RecordAttributes",
    "RecordStatus",
    "SyncPersistenceLayer",
    # operating a table
    "create_idempotency_table",
]
